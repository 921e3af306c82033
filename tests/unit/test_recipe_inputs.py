"""Recipe inputs (issue 13): paths relative to the recipe file, `validate`/`eval` overrides, `eval` leaving recipe.json
alone, secrets kept out of everything written, and a property test of validation as a whole.

Helpers, and the guard that stops a case that gets past the checks from running an algorithm, come from
test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_bad_input import META, ROOT, SCORE, SCPO, jsonl, model_dir, no_engine, refused  # noqa: F401
from train.cli import main
from train.config import ConfigError, load_recipe, recipe_to_dict
from train.config.loading import REDACTED, is_secret_key
from train.config.preflight import preflight

# ---- paths --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [META, ROOT / "recipes/self_rewarding/smollm2-135m-cpu.yaml"])
def test_shipped_data_paths_work_from_any_folder(tmp_path, monkeypatch, capsys, recipe):
    for cwd in (ROOT, tmp_path):
        monkeypatch.chdir(cwd)
        arg = recipe.relative_to(ROOT) if cwd == ROOT else recipe
        r = load_recipe(arg)
        assert Path(r.data.train_file) == ROOT / "recipes/data/instructions.jsonl"
        assert Path(r.meta_rewarding.judge_eval_file) == ROOT / "recipes/data/judge_labelled.jsonl"
        assert r.output_dir.startswith("runs/"), "output_dir stays relative to the working directory"
        assert main(["validate", str(arg)]) == 0
    assert list(tmp_path.iterdir()) == []


def test_paths_in_a_recipe_are_relative_to_it_overrides_to_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"prompt": "a"}])
    model = model_dir(folder / "my-model")
    p = folder / "r.yaml"
    p.write_text("algorithm: scpo\noutput_dir: out\nmodel: my-model\ndata: {source: jsonl, train_file: train.jsonl}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(p)
    assert r.data.train_file == str(folder / "train.jsonl") and r.model == str(model) and r.output_dir == "out"
    preflight(r)
    assert not (elsewhere / "out").exists()
    jsonl(elsewhere / "other.jsonl", [{"prompt": "b"}])
    r = load_recipe(p, ["data.train_file=other.jsonl", "model=./my-model"])  # typed in the shell: the cwd
    assert r.data.train_file == "other.jsonl" and r.model == "./my-model"
    with pytest.raises(ConfigError, match="model: path not found: ./my-model"):
        preflight(r)
    p.write_text("algorithm: scpo\noutput_dir: out\nmodel: ./missing\n")
    with pytest.raises(ConfigError, match=f"model: path not found: {folder}/missing"):
        preflight(load_recipe(p))


# ---- CLI: validate and eval take overrides; eval leaves recipe.json alone ------------------------------------------


def test_validate_takes_overrides(tmp_path, capsys):
    refused(capsys, ["validate", SCPO, "lora.r=0"], f"{SCPO}: `lora.r`: Input should be greater than or equal to 1")
    assert main(["validate", str(SCPO), str(SCORE), "iterations=1", "lora.r=8"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok  {SCPO}", f"ok  {SCORE}"]
    refused(capsys, ["validate", SCPO, SCORE, "scpo.beta=0.1"], "section `scpo` does not apply to algorithm `score`")
    refused(capsys, ["validate", "lora.r=8"], "validate: no recipe file given")


def _fake_eval(monkeypatch) -> None:
    """cmd_eval without an engine: the sampler is never built and `evaluate` returns a fixed row."""
    import train.cli
    import train.evaluate
    from train.loop import Run

    monkeypatch.setattr(Run, "sharded_sampler", property(lambda self: None))
    monkeypatch.setattr(train.evaluate, "evaluate", lambda sampler, adapter, items, recipe: {"accuracy": 0.5})
    monkeypatch.setattr(train.cli, "_table", lambda rows: "table")


def test_eval_takes_overrides_and_keeps_recipe_json(tmp_path, capsys, monkeypatch):
    _fake_eval(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.json").write_text('{"the": "last run"}')
    m = model_dir(tmp_path / "m")
    assert main(["eval", str(SCPO), f"output_dir={out}", f"model={m}", "data.num_eval=3"]) == 0, capsys.readouterr()
    assert (out / "recipe.json").read_text() == '{"the": "last run"}'
    assert json.loads((out / "eval.jsonl").read_text()) == {"checkpoint": "base", "accuracy": 0.5}
    refused(capsys, ["eval", SCPO, f"output_dir={out}", "data.nope=1"], "unknown key `data.nope`")


# ---- secrets ------------------------------------------------------------------------------------------------------


def test_secret_keys():
    for key in ("hub_token", "token", "HUB_TOKEN", "wandb_api_key", "openai_apikey", "client_secret", "db_password"):
        assert is_secret_key(key), key
    for key in ("server_api_key_env", "max_tokens", "max_new_tokens", "tokenizer", "pad_token_id", "learning_rate"):
        assert not is_secret_key(key), key


def test_token_never_written(tmp_path, capsys, monkeypatch):
    """`selfreward run` with `trainer.hub_token`: recipe.json, the wandb config, stdout and stderr never hold it."""
    import types

    import train.cli

    secret = "hf_SECRETsecret123"
    seen: dict = {}
    fake_wandb = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setattr(train.cli, "_algorithm", lambda name: lambda run: None)  # no phases: just the setup
    out, m = tmp_path / "out", model_dir(tmp_path / "m")
    args = ["run", str(SCPO), f"output_dir={out}", f"model={m}", f"trainer.hub_token={secret}", "logging.wandb=offline"]
    assert main(args) == 0
    cap = capsys.readouterr()
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["trainer"]["hub_token"] == REDACTED and saved["sampling"]["server_api_key_env"] == "VLLM_API_KEY"
    assert seen["config"]["trainer"]["hub_token"] == REDACTED
    for path in out.rglob("*"):
        assert not path.is_file() or secret not in path.read_text(errors="replace"), path
    assert secret not in cap.out + cap.err
    r = load_recipe(SCPO, [f"trainer.hub_token={secret}"])
    assert r.trainer["hub_token"] == secret, "the run itself still gets the value"
    assert secret not in json.dumps(recipe_to_dict(r))


def test_secret_value_not_echoed_in_errors(capsys):
    # TRL's message quotes the bad value; a secret that happens to be the same text is masked.
    args = ["validate", SCPO, "trainer.hub_token=nope", "trainer.lr_scheduler_type=nope"]
    line = refused(capsys, args, "trainer.lr_scheduler_type: trl.DPOConfig refuses it: <redacted> is not a valid")
    assert "nope" not in line


# ---- one real process: the console entry point, from another folder -----------------------------------------------


@pytest.mark.slow
def test_cli_process_from_another_folder(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algorithm: scpo\noutput_dir: out\niterations: 1\niterations: 2\n")
    shutil.copy(META, tmp_path / "meta.yaml")  # its relative data paths no longer lead anywhere
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, needle in [
        ([str(p)], f"{p}:4: invalid YAML (duplicate key `iterations`"),
        ([str(tmp_path / "meta.yaml")], f"data file not found: {tmp_path.parent}/data/instructions.jsonl"),
    ]:
        res = subprocess.run([sys.executable, "-m", "train", "run", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert [line for line in res.stderr.splitlines() if line.startswith("selfreward: error:")] == [
            f"selfreward: error: {res.stderr.split('selfreward: error: ', 1)[1].strip()}"
        ] and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# ---- property: validation sees a valid recipe or a ConfigError, never another exception ----------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["1e20", "-1", "abc", "cosine", "dapo", "sigmoid", "", " ", "0", "[0.5]", "{}", "\x00", "~nobody/x"]
    ),
)
# Mostly plausible values (small counts, fractions, flags), so that many recipes pass and reach the later checks.
PLAUSIBLE = st.one_of(st.integers(1, 64), st.floats(0.0, 1.0), st.booleans(), st.sampled_from([[0.5], ["+"], 2, 8]))
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))  # fmt: skip
# Where the recipe's keys point: files the test made (good, duplicate ids, not UTF-8, a model folder without a
# tokenizer), missing ones, odd ones. Never arbitrary paths: the validation reads what it is given.
PATHS = st.sampled_from(["good.jsonl", "good.jsonl", "dup.jsonl", "latin1.jsonl", "pairs.jsonl", "missing.jsonl",
                         "", ".", "sub", "good.jsonl/x", "no-tokenizer", "a\x00b", "/"])  # fmt: skip
SECTION_KEYS = {
    "data": ["source", "num_train", "num_eval", "max_a", "max_b", "operators", "prompt_field", "answer_field",
             "eval_limit", "hub_id", "nope"],
    "sampling": ["max_tokens", "max_model_len", "temperature", "top_p", "batch_size", "engine", "kv_cache_gib"],
    "lora": ["r", "alpha", "dropout", "target_modules"],
    "scpo": ["num_samples", "vote_threshold", "beta", "min_vote_margin", "pairs_per_prompt"],
    "meta_rewarding": ["num_responses", "length_rho", "meta_judge", "judge_eval_samples"],
    "score": ["stage1_steps", "beta1", "alpha"],
    "eval": ["enabled", "num_samples", "max_tokens"],
    "logging": ["wandb", "log_samples"],
    "trainer": ["learning_rate", "num_train_epochs", "per_device_train_batch_size", "lr_scheduler_type", "max_steps",
                "optim", "warmup_steps", "eval_strategy", "logging_steps", "num_generations", "hub_token", "seed",
                "not_a_field"],
}  # fmt: skip
TOP_KEYS = ["iterations", "seed", "max_prompts", "model_dtype", "distributed_timeout_s", "trust_remote_code", "nope"]
REWARDS = ["verifier", "self_verify", "nope", "rewards.verifier:get_verifier_reward", "rewards.verifier:Reward",
           "rewards.nope:x", "rewards.verifier.nope", ".x", ""]  # fmt: skip


@st.composite
def recipes(draw) -> tuple[str, list[str]]:
    """(YAML text, overrides): near-valid recipes with some wrong keys, values, paths, YAML and overrides."""
    algo = draw(st.sampled_from(["scpo", "meta_rewarding", "self_rewarding", "score", "scpo", "ppo"]))
    tree: dict = {"algorithm": algo}
    # Rare events are `== 9`: hypothesis favours small draws (and shrinks towards them), so 0 would be the common case.
    if draw(st.integers(0, 9)) != 9:
        tree["output_dir"] = draw(st.sampled_from(["out", "sub/out", "out", "", "good.jsonl", "good.jsonl/out", "/"]))
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=2)):
        tree[key] = draw(VALUES)
    if draw(st.booleans()):
        tree["model"] = draw(st.one_of(PATHS, st.sampled_from(["smollm2-135m-instruct", "org/name", "./m"])))
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=3, unique=True)):
        tree[section] = {k: draw(VALUES) for k in draw(st.lists(st.sampled_from(SECTION_KEYS[section]), max_size=2))}
    if draw(st.booleans()):
        tree["data"] = {"source": "jsonl", "train_file": draw(PATHS)} | (
            {"eval_file": draw(PATHS)} if draw(st.booleans()) else {}
        )
    if algo in ("meta_rewarding", "self_rewarding") and draw(st.booleans()):
        tree["meta_rewarding"] = {
            "judge_eval_file": draw(st.sampled_from(["pairs.jsonl", "good.jsonl", "latin1.jsonl"]))
        }
    if algo == "score" and draw(st.booleans()):
        tree["score"] = {"reward": draw(st.sampled_from(REWARDS))}
    text = yaml.safe_dump(tree, allow_unicode=True)
    if draw(st.integers(0, 9)) == 9:  # broken YAML now and then: a cut, a duplicate key, a tab, an open bracket
        text = draw(st.sampled_from([text[: len(text) // 2], text + "algorithm: scpo\n", "\t" + text, text + "x: [\n"]))
    dotted = [f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + TOP_KEYS + ["output_dir", "model"]
    override = st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(dotted + ["data.train_file", "a..b", "trainer", "=1"]),
        st.one_of(st.sampled_from(["1", "0.5", "true", "1e20", "[1, 2]", "{a: 1, a: 2}", "null", "-5", "good.jsonl"]),
                  st.text(max_size=8)),
    )  # fmt: skip
    overrides = draw(st.lists(override, max_size=2))
    if draw(st.integers(0, 9)) == 9:
        overrides.append(draw(st.text(max_size=8)))  # not key=value at all
    return text, overrides


def test_validation_sees_a_valid_recipe_or_a_config_error(tmp_path_factory):
    """Random recipes and overrides through `load_recipe` + `preflight`: a Recipe or a ConfigError, nothing else."""
    folder = tmp_path_factory.mktemp("prop")
    jsonl(folder / "good.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    jsonl(folder / "dup.jsonl", [{"id": "a", "prompt": "x", "answer": "1"}, {"id": "a", "prompt": "y", "answer": "2"}])
    (folder / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    jsonl(folder / "pairs.jsonl", [{"prompt": "p", "response_a": "a", "response_b": "b", "preferred": "a"}])
    (folder / "sub").mkdir()
    model_dir(folder / "no-tokenizer", tokenizer=False)
    recipe_file = folder / "r.yaml"
    recipe_file.touch()
    cwd = os.getcwd()
    os.chdir(folder)  # relative output_dirs and overrides land here; preflight creates nothing (asserted below)
    before = sorted(p.name for p in folder.iterdir())

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(recipes())
    def check(case: tuple[str, list[str]]) -> None:
        text, overrides = case
        recipe_file.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            preflight(load_recipe(recipe_file, overrides))
        except ConfigError as e:
            assert "\n" not in str(e), "one line"

    try:
        check()
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("override", ["a..b=\n", "x\ny", "=\r\n"])
def test_override_errors_are_one_line_whatever_the_shell_passed(override):
    from train.config.loading import parse_override

    with pytest.raises(ConfigError) as e:
        parse_override(override)
    assert "\n" not in str(e.value) and "\r" not in str(e.value) and str(e.value).startswith("override `")
