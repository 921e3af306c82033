"""Bad input (issue 13): each case exits 2 with one `selfreward: error:` line naming the key, file or line, no
traceback, and nothing written: every check that needs no model runs before `output_dir` is created.

The CLI runs in-process (`train.cli.main`): no case here gets as far as building an engine. docs/results.md
"Bad input (issue 13)" lists the cases with their messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from train.cli import main
from train.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
SCPO = ROOT / "recipes/scpo/smollm2-135m-cpu.yaml"
SCORE = ROOT / "recipes/score/smollm2-135m-cpu.yaml"
META = ROOT / "recipes/meta_rewarding/smollm2-135m-cpu.yaml"


@pytest.fixture(autouse=True)
def no_engine(monkeypatch):
    """A case that wrongly gets past the checks fails here at once, instead of running an algorithm in-process."""
    import train.cli
    from train.loop import Run

    def refuse(*args, **kwargs):
        raise AssertionError("the command got past its checks: it would run an algorithm or build an engine")

    monkeypatch.setattr(train.cli, "_algorithm", lambda name: refuse)
    monkeypatch.setattr(Run, "sampler", property(refuse))


def refused(capsys, args: list, needle: str, out: Path | None = None) -> str:
    """Run the CLI; assert exit 2, exactly one error line containing `needle`, no traceback, `out` not created."""
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if line.startswith("selfreward: error:")]
    assert code == 2, cap.err
    assert len(errors) == 1 and needle in errors[0], cap.err
    assert "Traceback" not in cap.err + cap.out
    if out is not None:
        assert not out.exists(), f"{out} was created by a refused run"
    return errors[0]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def model_dir(root: Path, tokenizer: bool = True, weights: bool = True) -> Path:
    """A folder that passes (or, without a tokenizer or weights, fails) the model checks; nothing loads it."""
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


# ---- data ---------------------------------------------------------------------------------------------------------


def _jsonl_run(tmp_path: Path, train: Path, *more: str) -> list:
    return ["run", SCPO, "data.source=jsonl", f"data.train_file={train}", f"output_dir={tmp_path}/out", *more]


def test_data_not_utf8_names_file_and_line(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"prompt": "What is 1 + 1?"}\n{"prompt": "caf\xe9"}\n')
    refused(capsys, _jsonl_run(tmp_path, train), f"{train}:2: not UTF-8 text (byte 0xe9", tmp_path / "out")


@pytest.mark.parametrize(
    "rows, needle",
    [
        (
            [{"id": "q1", "prompt": "a"}, {"id": "q2", "prompt": "b"}, {"id": "q1", "prompt": "c"}],
            ":3: duplicate id `q1`",
        ),
        ([{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}], ":2: duplicate id `7` (first on line 1)"),
        ([{"prompt": "a"}, {"id": "train-1", "prompt": "b"}], ":2: duplicate id `train-1`"),  # explicit = generated
    ],
)
def test_data_duplicate_ids_are_refused(tmp_path, capsys, rows, needle):
    # ScPO keys votes by id: two questions with one id would pool their samples into one vote.
    train = jsonl(tmp_path / "train.jsonl", rows)
    refused(capsys, _jsonl_run(tmp_path, train), needle, tmp_path / "out")


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": 12}, ":1: field `prompt` must be a string, not int"),
        ({"prompt": ["a", "b"]}, ":1: field `prompt` must be a string, not list"),
        ({"prompt": "  "}, ":1: field `prompt` is empty"),
        ("[1, 2]", ":1: each line must be a JSON object"),
        ('{"prompt": "a"', ":1: invalid JSON"),
    ],
)
def test_data_prompt_must_be_a_string(tmp_path, capsys, row, needle):
    train = jsonl(tmp_path / "train.jsonl", [row])
    refused(capsys, _jsonl_run(tmp_path, train), needle, tmp_path / "out")


def test_data_unreadable_file(tmp_path, capsys, monkeypatch):
    train = jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:  # chmod 000 does not stop root, who runs CI containers
        if self == train:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    refused(
        capsys, _jsonl_run(tmp_path, train), f"{train}: cannot read data file (Permission denied)", tmp_path / "out"
    )


def test_data_eval_file_checked_too(tmp_path, capsys):
    train = jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    evals = jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    args = _jsonl_run(tmp_path, train, f"data.eval_file={evals}")
    refused(capsys, args, f"{evals}:2: missing field `answer`", tmp_path / "out")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"prompt": "p", "response_a": "x", "response_b": "y", "preferred": "a"}\n{not json\n', ":2: invalid JSON"),
        (b'{"prompt": "p", "response_a": "\xff", "response_b": "y", "preferred": "a"}\n', ":1: not UTF-8 text"),
        (
            b'{"prompt": "p", "response_a": 1, "response_b": "y", "preferred": "a"}\n',
            ":1: field `response_a` must be a string, not int",
        ),
        (
            b'{"prompt": "p", "response_a": "x", "response_b": "y", "preferred": "c"}\n',
            ":1: `preferred` must be a or b",
        ),
        (b"\n", ": no labelled pairs"),
    ],
)
def test_judge_eval_file_bad_content(tmp_path, capsys, content, needle):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(content)
    args = ["run", META, f"meta_rewarding.judge_eval_file={pairs}", f"output_dir={tmp_path}/out"]
    refused(capsys, args, f"{pairs}{needle}", tmp_path / "out")
    refused(capsys, ["eval", META, f"meta_rewarding.judge_eval_file={pairs}", f"output_dir={tmp_path}/out"], needle)
    assert not (tmp_path / "out").exists()


def test_eval_data_flag_read_before_anything_is_written(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("oops\n")
    refused(capsys, ["eval", META, f"output_dir={tmp_path}/out", "--data", pairs], f"{pairs}:1: invalid JSON")
    assert not (tmp_path / "out").exists()


# ---- output_dir ---------------------------------------------------------------------------------------------------


def test_output_dir_empty(capsys):
    refused(capsys, ["run", SCPO, "output_dir="], "`output_dir`: is empty")
    refused(capsys, ["run", SCPO, "output_dir=  "], "`output_dir`: is empty")


def test_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    refused(capsys, ["run", SCPO, f"output_dir={f}"], f"output_dir: {f} exists and is a file, not a folder")
    assert f.read_text() == "x"


def test_output_dir_under_a_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    refused(capsys, ["run", SCPO, f"output_dir={f}/a/b"], f"cannot be created: {f} is a file")


def test_output_dir_not_writable(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    # chmod does not stop root (CI containers run as root): the check is os.access, so deny it there.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else access(p, mode, **kw))
    refused(capsys, ["run", SCPO, f"output_dir={locked}/out"], f"cannot be created: {locked} is not writable")
    refused(capsys, ["run", SCPO, f"output_dir={locked}"], f"output_dir: {locked} is not writable")
    assert list(locked.iterdir()) == []


def test_output_dir_broken_link(tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    refused(capsys, ["run", SCPO, f"output_dir={tmp_path}/link"], "is a broken symbolic link")


# ---- values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "sampling.max_tokens=1e20",
            "`sampling.max_tokens`: Unable to parse input string as an integer, exceeded "
            "maximum size (allowed: >= 1, <= 2097152)",
        ),  # fmt: skip
        ("sampling.max_tokens=3000000", "`sampling.max_tokens`: Input should be less than or equal to 2097152"),
        ("scpo.num_samples=1000000000000", "`scpo.num_samples`: Input should be less than or equal to 1024"),
        ("lora.r=1024", "`lora.r`: Input should be less than or equal to 512"),
        ("lora.r=0", "`lora.r`: Input should be greater than or equal to 1"),
        ("seed=-1", "`seed`: Input should be greater than or equal to 0"),
        ("distributed_timeout_s=1e20", "`distributed_timeout_s`: Input should be less than or equal to 2592000"),
        ("data.max_a=1000000000", "`data.max_a`: Input should be less than or equal to 1000"),
        ("iterations=100000", "`iterations`: Input should be less than or equal to 999"),
    ],
)
def test_absurd_sizes_name_the_limit(tmp_path, capsys, override, needle):
    refused(capsys, ["run", SCPO, override, f"output_dir={tmp_path}/out"], needle, tmp_path / "out")


def test_lora_limit_is_vllms_largest_rank():
    from train.config.schema import MAX_LORA_RANK
    from train.engine.base import VLLM_LORA_RANKS

    assert MAX_LORA_RANK == VLLM_LORA_RANKS[-1]


@pytest.mark.parametrize(
    "recipe, override, needle",
    [
        (SCPO, "trainer.learning_rate=abc", "trainer.learning_rate: 'abc': Input should be a valid number"),
        (SCPO, "trainer.num_train_epochs=[1]", "trainer.num_train_epochs: [1]: Input should be a valid number"),
        (SCPO, "trainer.max_steps=1.5", "trainer.max_steps: 1.5: Input should be a valid integer"),
        (SCPO, "trainer.gradient_checkpointing=maybe", "trainer.gradient_checkpointing: 'maybe'"),
        (SCPO, "trainer.lr_scheduler_type=nope", "trainer.lr_scheduler_type: trl.DPOConfig refuses it: nope is not"),
        (SCPO, "trainer.optim=sgdd", "trainer.optim: trl.DPOConfig refuses it: sgdd is not a valid OptimizerNames"),
        (
            SCORE,
            "trainer.num_generations=3",
            "trainer.num_generations: trl.GRPOConfig refuses it: generation_batch_size",
        ),
        (SCORE, "score.reward=rewards.verifer:get_verifier_reward", "score.reward: reward `rewards.verifer:"),
        (SCORE, "score.reward=rewards.verifier:nope", "score.reward: reward `rewards.verifier:nope`: cannot import"),
        (SCORE, "score.reward=rewards.verifier", "score.reward: reward `rewards.verifier`: module is not callable"),
        (SCORE, "score.reward=rewards.verifier:__name__", "reward `rewards.verifier:__name__`: str is not callable"),
        (SCORE, "score.reward=selfverify", "score.reward: reward `selfverify`: not one of"),
    ],
)
def test_trainer_values_and_reward_checked_at_validation(tmp_path, capsys, recipe, override, needle):
    refused(capsys, ["run", recipe, override, f"output_dir={tmp_path}/out"], needle, tmp_path / "out")
    refused(capsys, ["validate", recipe, override], needle)


def test_trainer_values_coerced_and_probe_leaves_no_state(tmp_path):
    from accelerate.state import PartialState

    before = dict(PartialState._shared_state)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = load_recipe(SCPO, ["trainer.max_steps='3'", "trainer.learning_rate=1", "trainer.tf32=true"])
    finally:
        os.chdir(cwd)
    assert (
        r.trainer["max_steps"] == 3 and r.trainer["learning_rate"] == 1.0 and type(r.trainer["learning_rate"]) is float
    )
    assert r.trainer["tf32"] is True, "machine-dependent keys are left to the trainer (tf32 needs an Ampere GPU)"
    assert dict(PartialState._shared_state) == before, "the probe created no accelerate state (no process group)"
    assert list(tmp_path.iterdir()) == [], "the probe wrote nothing"


# ---- YAML, model, report, docs ------------------------------------------------------------------------------------


def test_yaml_duplicate_keys_name_key_and_line(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("algorithm: scpo\niterations: 1\noutput_dir: out\niterations: 3\n")
    refused(capsys, ["run", p], f"{p}:4: invalid YAML (duplicate key `iterations` (first on line 2))")
    p.write_text("algorithm: scpo\noutput_dir: out\nsampling:\n  temperature: 0.5\n  top_p: 0.9\n  temperature: 1\n")
    refused(capsys, ["validate", p], f"{p}:6: invalid YAML (duplicate key `temperature` (first on line 4))")


def test_yaml_merge_keys_may_override_and_flow_duplicates_fail():
    import yaml

    from train.config.loading import _yaml

    assert _yaml("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n") == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}
    with pytest.raises(yaml.YAMLError, match="duplicate key `k` \\(first on line 1\\)"):
        _yaml("a: {k: 1, k: 2}\n")


def test_recipe_not_utf8(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"algorithm: scpo\noutput_dir: out\ndata:\n  instruction: \xe9\n")
    refused(capsys, ["validate", p], f"{p}:4: not UTF-8 text (byte 0xe9)")


@pytest.mark.parametrize(
    "tokenizer, weights, needle",
    [(False, True, "has no tokenizer (none of tokenizer.json"), (True, False, "has no .safetensors weights")],
)
def test_model_dir_without_tokenizer_or_safetensors(tmp_path, capsys, tokenizer, weights, needle):
    m = model_dir(tmp_path / "m", tokenizer=tokenizer, weights=weights)
    (m / "pytorch_model.bin").write_bytes(b"pickle")
    refused(capsys, ["run", SCPO, f"model={m}", f"output_dir={tmp_path}/out"], f"model: {m} {needle}", tmp_path / "out")


def test_adapters_load_from_safetensors_only(tmp_path):
    from train.models import load_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        load_adapter(None, tmp_path)


def test_no_pickle_loads_in_our_code():
    """Our own weight loads go through safetensors: no torch.load, and PEFT adapters through `load_adapter`."""
    for path in (ROOT / "train").rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text, path
        if path.name != "models.py":
            assert "PeftModel.from_pretrained(" not in text, f"{path}: use train.models.load_adapter"


def _run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"algorithm": "scpo", "model": "m"}))
    return out


@pytest.mark.parametrize(
    "name, content, needle",
    [
        (
            "metrics.jsonl",
            b'{"iteration": 0, "eval/accuracy": 0.5}\n{"iteration": 1, "eval/acc',
            "metrics.jsonl:2: invalid JSON",
        ),
        ("metrics.jsonl", b'{"iteration": 0}\n{"iteration": 1, "x": "\xff"}\n', "metrics.jsonl:2: not UTF-8 text"),
        ("recipe.json", b'{"algorithm": "sc', "recipe.json:1: invalid JSON"),
        ("recipe.json", b'{"algorithm": "\xfe"}', "recipe.json:1: not UTF-8 text"),
    ],
)
def test_report_torn_or_not_utf8(tmp_path, capsys, name, content, needle):
    out = _run_dir(tmp_path)
    (out / name).write_bytes(content)
    refused(capsys, ["report", out], needle)
    assert not (out / "report.html").exists()


def test_report_skips_bad_sample_lines(tmp_path, capsys):
    out = _run_dir(tmp_path)
    (out / "iter_1").mkdir()
    (out / "iter_1" / "pairs.jsonl").write_bytes(b'{"chosen": "\xff"}\n{"chosen": "kept"}\n{"torn')
    assert main(["report", str(out)]) == 0
    assert "kept" in (out / "report.html").read_text()


def test_docs_out_into_a_missing_folder(tmp_path, capsys):
    refused(capsys, ["docs", "--out", tmp_path / "no" / "ref.md"], f"docs --out {tmp_path}/no/ref.md: cannot write")
    refused(capsys, ["docs", "--out", tmp_path], "cannot write")
