"""Fault injection (issue 6): real processes, real signals, real triggers; each test fails if its protection breaks.

Runs use the ScPO CPU recipe on the tiny random Llama with the HF engine. The tiny model writes random text, so
`data.answer_type=exact` (the normalised last line is the answer) and τ = 0 give one pair per prompt.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/scpo/smollm2-135m-cpu.yaml"
STARTUP_S = 240  # first phase line of a fresh process (imports + model load), generous for a loaded 2-core box


def tiny_scpo(model: str, out: Path, *extra: str) -> list[str]:
    """Overrides for a tiny ScPO run (later overrides win): 4 prompts x 2 samples x 8 tokens, 2 DPO steps."""
    return [
        f"model={model}",
        f"output_dir={out}",
        "sampling.engine=hf",
        "max_prompts=4",
        "scpo.num_samples=2",
        "sampling.max_tokens=8",
        "sampling.batch_size=2",  # two generation chunks: a .partial file exists mid-phase
        "scpo.vote_threshold=[0.0]",
        "scpo.min_vote_margin=0",  # the random model's answers all differ: 1-1 ties are its only pairs
        "data.answer_type=exact",
        "iterations=1",
        "data.num_eval=2",
        "eval.num_samples=2",
        "eval.enabled=false",
        "trainer.num_train_epochs=1",
        "trainer.per_device_train_batch_size=2",
        "trainer.gradient_accumulation_steps=1",
        "trainer.save_steps=1",  # a TRL checkpoint after every step: mid-train resume is exercised
        *extra,
    ]


class Proc:
    """`python -m train run RECIPE ...` in the background, its output collected line by line."""

    def __init__(self, overrides: list[str], recipe: str = RECIPE, env: dict[str, str] | None = None):
        env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
        self.p = subprocess.Popen(
            [sys.executable, "-m", "train", "run", recipe, *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.err: list[str] = []
        self.out: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True),
            threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    def wait_until(self, cond, what: str, timeout: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.p.poll() is not None:
                raise AssertionError(f"process exited ({self.p.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.01)

    def wait_line(self, text: str, timeout: float = STARTUP_S) -> None:
        self.wait_until(lambda: any(text in ln for ln in list(self.err)), f"stderr line `{text}`", timeout)

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def run_to_end(overrides: list[str], recipe: str = RECIPE, env: dict[str, str] | None = None) -> Proc:
    proc = Proc(overrides, recipe, env)
    rc = proc.finish()
    assert rc == 0, proc.stderr[-4000:]
    return proc


def _is_final(path: Path, out: Path) -> bool:
    """Files under their final (published) name; .partial/.tmp and TRL checkpoints are work in progress."""
    parts = path.relative_to(out).parts
    return not (
        path.name.endswith((".partial", ".tmp"))
        or "checkpoints" in parts
        or any(p.endswith(".tmp") for p in parts)
        or "wandb" in parts
    )


def final_files(out: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every final file."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and _is_final(p, out)}


REWRITTEN_EACH_RUN = {"recipe.json", "metrics.jsonl"}  # by design: the recipe and the metrics table are refreshed


def assert_no_torn_finals(out: Path) -> None:
    """Every final JSONL parses line by line, every final JSON parses, every adapter dir is complete."""
    from safetensors import safe_open

    for rel in final_files(out):
        path = out / rel
        if path.suffix == ".jsonl":
            text = path.read_text()
            assert text == "" or text.endswith("\n"), f"{rel}: last line not terminated"
            for i, line in enumerate(text.splitlines()):
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise AssertionError(f"{rel}:{i + 1} is torn: {e}") from None
        elif path.suffix == ".json":
            json.loads(path.read_text())
    for adapter in out.glob("iter_*/adapter"):
        names = {p.name for p in adapter.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names, f"{adapter}: {names}"
        json.loads((adapter / "adapter_config.json").read_text())
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            assert list(f.keys()), f"{adapter}: empty safetensors"


def pairs_per_iteration(out: Path) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in sorted(out.glob("iter_*/pairs.jsonl"))}


def _complete(path: Path) -> bool:
    """`path` exists and, for JSON, parses (transformers writes trainer_state.json in place)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        return path.stat().st_size > 0
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- 1. SIGTERM in every phase, then resume


@pytest.mark.slow
def test_sigterm_in_each_phase_exits_130_and_resume_completes(tiny_model_dir, tmp_path):
    """One run, interrupted in iter 0 eval, iter 1 generate (after a chunk), iter 1 train (after a TRL checkpoint)
    and iter 1 eval; each stop is within 60 s with status 130 and the resume message; finished phases keep their
    files byte-for-byte (mtime_ns); the last rerun completes and training resumed from the checkpoint."""
    out = tmp_path / "o"
    overrides = tiny_scpo(tiny_model_dir, out, "eval.enabled=true")
    it1 = out / "iter_1"
    stops = [
        ("iter 0: eval ...", None, out / "iter_0" / "eval.json"),
        ("iter 1: generate ...", it1 / "samples.jsonl.rank0.partial", it1 / "samples.jsonl"),
        ("iter 1: train ...", it1 / "checkpoints" / "checkpoint-1" / "trainer_state.json", it1 / "adapter"),
        ("iter 1: eval ...", None, it1 / "eval.json"),
    ]
    finished: dict[str, int] = {}
    procs = []
    for line, marker, artifact in stops:
        proc = Proc(overrides)
        procs.append(proc)
        proc.wait_line(line)
        if marker is not None:
            proc.wait_until(lambda m=marker: _complete(m), f"{marker.name} during `{line}`")
        proc.p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.finish(timeout=60)
        assert time.monotonic() - t0 < 60
        assert rc == 130, f"{line}: exit {rc}\n{proc.stderr[-3000:]}"
        assert "selfreward: interrupted; rerun the same command to resume" in proc.stderr
        assert not artifact.exists(), f"the signal was meant to land in `{line}`, but {artifact.name} was published"
        now = final_files(out)
        changed = {f for f, m in finished.items() if now.get(f) != m and f not in REWRITTEN_EACH_RUN}
        assert not changed, f"finished phases were redone or touched after `{line}`: {changed}"
        finished = now
        assert_no_torn_finals(out)
    # generate published its rows and dropped the .partial it resumed from
    assert (it1 / "samples.jsonl").exists() and not list(it1.glob("samples.jsonl.*partial"))
    # the 4th process resumed training from checkpoint-1: it logged only step 2 of 2
    logged = procs[3].stdout + procs[3].stderr  # transformers prints its per-step log dicts to stdout
    assert len(re.findall(r"'loss'", logged)) == 1, logged[-3000:]
    last = run_to_end(overrides)
    for phase in ("iter 0: eval done", "generate done", "vote done", "pairs done", "train done"):
        assert phase in last.stderr
    now = final_files(out)
    assert {f for f, m in finished.items() if now.get(f) != m} <= REWRITTEN_EACH_RUN
    assert (it1 / "eval.json").exists() and json.loads((it1 / "phases" / "train.json").read_text())["metrics"][
        "steps"
    ] == 2.0
    assert not (it1 / "checkpoints").exists(), "checkpoints are removed once the adapter is published"
    assert [r["iteration"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1]


@pytest.mark.slow
def test_sigterm_in_judge_and_meta_judge_phases_resumes(tiny_model_dir, tmp_path):
    """The Meta-Rewarding phases that only the model-as-judge has: a stop in each keeps what came before, and the
    rerun skips the judge phase and redoes the meta-judge phase. The random tiny model's forced verdicts give no pair
    to train on, so the rerun ends in the clean "0 preference pairs" stop after them (resuming training is
    covered by test_sigterm_in_each_phase_exits_130_and_resume_completes)."""
    out = tmp_path / "o"
    overrides = [
        f"model={tiny_model_dir}",
        f"output_dir={out}",
        "sampling.engine=hf",
        "max_prompts=3",
        "iterations=1",
        "sampling.max_tokens=8",
        "meta_rewarding.num_responses=4",
        "meta_rewarding.num_judgements=3",
        "meta_rewarding.judge_max_tokens=48",  # long enough that the signal lands inside the phase
        "eval.enabled=false",
    ]
    recipe = "recipes/meta_rewarding/smollm2-135m-cpu.yaml"
    it1 = out / "iter_1"
    finished: dict[str, int] = {}
    for line, artifact in (("iter 1: judge ...", "judgements.jsonl"), ("iter 1: meta_judge ...", "judge_pairs.jsonl")):
        proc = Proc(overrides, recipe=recipe)
        proc.wait_line(line)
        proc.p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.finish(timeout=60)
        assert time.monotonic() - t0 < 60 and rc == 130, f"{line}: exit {rc}\n{proc.stderr[-3000:]}"
        assert "selfreward: interrupted; rerun the same command to resume" in proc.stderr
        assert not (it1 / artifact).exists(), f"the signal was meant to land in `{line}`"
        now = final_files(out)
        assert not {f for f, m in finished.items() if now.get(f) != m and f not in REWRITTEN_EACH_RUN}
        finished = now
        assert_no_torn_finals(out)
    assert "iter_1/responses.jsonl" in finished and "iter_1/judgements.jsonl" in finished
    last = Proc(overrides, recipe=recipe)
    assert last.finish() == 1, last.stderr[-3000:]
    assert "iter 1: judge done (judgements.jsonl), skipping" in last.stderr and "iter 1: meta_judge took" in last.stderr
    assert "selfreward: stopped: iteration 1 produced 0 preference pairs" in last.stderr
    assert (it1 / "judge_pairs.jsonl").is_file() and not (it1 / "adapter").exists()
    now = final_files(out)
    assert {f for f, m in finished.items() if now.get(f) != m} <= REWRITTEN_EACH_RUN


# ---------------------------------------------------------------- 2. SIGKILL mid-run


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_leaves_no_torn_artifact(tiny_model_dir, tmp_path):
    """SIGKILL the moment TRL starts writing checkpoint-1 (usually leaving it torn): every final file is whole,
    and the rerun discards the torn checkpoint and completes."""
    out = tmp_path / "o"
    overrides = tiny_scpo(tiny_model_dir, out)
    ckpt = out / "iter_1" / "checkpoints" / "checkpoint-1"
    proc = Proc(overrides)
    proc.wait_until(ckpt.exists, "checkpoint-1")
    proc.p.send_signal(signal.SIGKILL)
    assert proc.finish(timeout=60) == -signal.SIGKILL
    assert_no_torn_finals(out)
    assert not (out / "iter_1" / "adapter").exists()
    before = final_files(out)
    last = run_to_end(overrides)
    assert "generate done" in last.stderr and "pairs done" in last.stderr
    assert_no_torn_finals(out)
    assert (out / "iter_1" / "adapter" / "adapter_model.safetensors").is_file()
    now = final_files(out)
    assert {f for f, m in before.items() if now.get(f) != m} <= REWRITTEN_EACH_RUN


def test_torn_checkpoints_are_skipped(tmp_path):
    from train.trainers.checkpoints import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-3").mkdir()  # killed before trainer_state.json
    (tmp_path / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-4").mkdir()  # killed while writing trainer_state.json
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


# ---------------------------------------------------------------- 3. chaos: 5 random SIGKILLs vs an uninterrupted run


@pytest.mark.slow
def test_chaos_five_random_kills_match_an_uninterrupted_run(tiny_model_dir, tmp_path):
    ref, chaos = tmp_path / "ref", tmp_path / "chaos"
    extra = ("iterations=2", "scpo.vote_threshold=[0.0,0.0]")
    t0 = time.monotonic()
    run_to_end(tiny_scpo(tiny_model_dir, ref, *extra))
    ref_s = time.monotonic() - t0
    rng = random.Random(6)
    landed = 0
    for i in range(5):
        proc = Proc(tiny_scpo(tiny_model_dir, chaos, *extra))
        delay = rng.uniform(5.0, max(6.0, 0.5 * ref_s))
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.p.poll() is None:
            time.sleep(0.02)
        if proc.p.poll() is None:
            proc.p.send_signal(signal.SIGKILL)
            landed += 1
        rc = proc.finish(timeout=120)
        assert rc in (0, -signal.SIGKILL), f"kill {i}: exit {rc}\n{proc.stderr[-3000:]}"
        assert_no_torn_finals(chaos)
    assert landed >= 3, f"only {landed} of 5 kills hit a live run (reference took {ref_s:.0f}s)"
    run_to_end(tiny_scpo(tiny_model_dir, chaos, *extra))
    assert sorted(final_files(chaos)) == sorted(final_files(ref))
    assert pairs_per_iteration(chaos) == pairs_per_iteration(ref) == {"iter_1": 4, "iter_2": 4}
    for k in (1, 2):
        for name in ("generate", "vote", "pairs"):
            a, b = (json.loads((d / f"iter_{k}" / "phases" / f"{name}.json").read_text()) for d in (ref, chaos))
            assert {m: a["metrics"][m] for m in ("samples", "prompts", "pairs") if m in a["metrics"]} == {
                m: b["metrics"][m] for m in ("samples", "prompts", "pairs") if m in b["metrics"]
            }
        steps = [
            json.loads((d / f"iter_{k}" / "phases" / "train.json").read_text())["metrics"]["steps"]
            for d in (ref, chaos)
        ]
        assert steps == [2.0, 2.0]
    assert_no_torn_finals(chaos)
    assert (
        not list(chaos.rglob("*.partial")) and not list(chaos.rglob("*.tmp")) and not list(chaos.rglob("checkpoints"))
    )


# ---------------------------------------------------------------- 4. NaN loss, all-null judge scores


def _seed_scpo_artifacts(it: Path, pairs: list[dict]) -> None:
    """Pre-write iteration 1's generate/vote/pairs artifacts, so the run resumes straight into training."""
    from train.runtime.artifacts import write_json, write_jsonl

    write_jsonl(it / "samples.jsonl", [{"prompt_id": p["prompt_id"]} for p in pairs])
    write_jsonl(it / "votes.jsonl", [{"prompt_id": p["prompt_id"]} for p in pairs])
    write_jsonl(it / "pairs.jsonl", pairs)
    for name in ("generate", "vote", "pairs"):
        write_json(it / "phases" / f"{name}.json", {"metrics": {}, "seconds": 0.0})


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    pairs = [
        {
            "prompt_id": f"p{i}",
            "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
            "chosen": str(i + 1),
            "rejected": f"The answer is {i + 7}, I think.",
            "weight": 1.0,
        }
        for i in range(4)
    ]
    _seed_scpo_artifacts(out / "iter_1", pairs)
    proc = Proc(tiny_scpo(tiny_model_dir, out, "trainer.learning_rate=1e30", "trainer.per_device_train_batch_size=1"))
    rc = proc.finish()
    assert "pairs done" in proc.stderr and "iter 1: train ..." in proc.stderr
    m = re.search(r"DPO loss became (nan|inf|-inf) at optimizer step (\d+)", proc.stderr)
    assert rc != 0 and m, f"exit {rc}\n{proc.stderr[-3000:]}"
    assert 2 <= int(m.group(2)) <= 4, "step 1 is finite (policy = reference); lr 1e30 blows up the next one"
    assert rc == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    stop = [ln for ln in proc.stderr.splitlines() if ln.startswith("selfreward: stopped: iter 1: DPO loss became")]
    assert len(stop) == 1 and "trainer.learning_rate (now 1e+30)" in stop[0], stop
    assert not (out / "iter_1" / "adapter").exists(), "no adapter is published from a diverged run"
    assert not (out / "iter_1" / "phases" / "train.json").exists()


@pytest.mark.slow
def test_every_judge_score_null_stops_cleanly(tiny_model_dir, tmp_path):
    """Real trigger: the random tiny model never writes `Score: X`, and force_verdict is off."""
    out = tmp_path / "o"
    proc = Proc(
        [
            f"model={tiny_model_dir}",
            f"output_dir={out}",
            "sampling.engine=hf",
            "max_prompts=3",
            "iterations=1",
            "sampling.max_tokens=8",
            "meta_rewarding.num_responses=2",
            "meta_rewarding.num_judgements=2",
            "meta_rewarding.judge_max_tokens=16",
            "meta_rewarding.force_verdict=false",
            "eval.enabled=false",
        ],
        recipe="recipes/self_rewarding/smollm2-135m-cpu.yaml",
    )
    rc = proc.finish()
    assert rc == 1, proc.stderr[-3000:]
    stopped = [ln for ln in proc.err if ln.startswith("selfreward: stopped:")]
    assert len(stopped) == 1 and "produced 0 preference pairs; every judge score may be null" in stopped[0]
    assert "Traceback" not in proc.stderr
    it = out / "iter_1"
    judged = [json.loads(ln) for ln in (it / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == 3 * 2
    assert all(j["scores"] == [None, None] and j["mean_score"] is None for j in judged)
    metrics = json.loads((it / "phases" / "judge.json").read_text())["metrics"]
    assert metrics["judge_parse_rate"] == 0.0 and metrics["score_mean"] is None
    assert metrics["all_null_responses"] == 6
    assert (it / "actor_pairs.jsonl").read_text() == ""
    assert not (it / "adapter").exists()


def test_all_null_scores_in_pair_selection():
    from rewards.judge_pairs import battle_matrix, elo_scores, pick_meta_judge_response, select_actor_pair

    assert select_actor_pair(["short", "a longer one"], [None, None], 0.0) is None
    assert select_actor_pair(["short", "a longer one"], [None, None], 0.32, length_control=True) is None
    assert select_actor_pair(["a", "b", "c"], [None, 4.0, None], 0.0) is None  # one scored response: no pair
    assert pick_meta_judge_response([[None, None, None], [None], []]) is None
    assert pick_meta_judge_response([[None, 2.0], [1.0, None, 5.0]]) == 1  # the nulls are skipped, not zeros
    elo = elo_scores(battle_matrix(3, [(0, 1, None), (1, 2, None)]))  # every meta-verdict unparseable
    assert len(elo) == 3 and all(abs(float(e) - float(elo[0])) < 1e-9 for e in elo)


def test_prompts_longer_than_the_context_are_skipped_and_counted(tiny_model_dir, tmp_path):
    from train.config import Recipe
    from train.errors import StopRun
    from train.loop import Run

    recipe = Recipe.model_validate(
        {"algorithm": "scpo", "output_dir": str(tmp_path / "out"), "sampling": {"max_model_len": 128}}
    )
    run = Run(recipe, model_path=tiny_model_dir)  # the tokenizer of the tiny model is all this needs
    items = [{"id": "short", "prompt": "What is 2 + 3?", "answer": "5"}]
    items.append({"id": "long", "prompt": "word " * 200, "answer": "0"})
    items.append({"id": "edge", "prompt": "What is 1 + 1?" + " ok" * 40, "answer": "2"})
    kept = run.fit_context(items, "train", reserve=64)  # 128 - 64 = 64 prompt tokens allowed
    assert [it["id"] for it in kept] == ["short"]
    skipped = [json.loads(x) for x in (run.out / "skipped_train_prompts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in skipped] == ["long", "edge"] and all(r["prompt_tokens"] > 64 for r in skipped)
    assert run.iteration_row(1)["data/skipped_train_prompts"] == 2
    with pytest.raises(StopRun, match=r"every eval prompt \(2\) is longer than 64 tokens.*sampling.max_model_len"):
        run.fit_context(items[1:], "eval", reserve=64)


# ---------------------------------------------------------------- 5. fuzzing the recipe loader

VALID = yaml.safe_load((ROOT / RECIPE).read_text())
KEYS = ["seed", "iterations", "model", "output_dir", "max_prompts", "trust_remote_code"] + [
    f"{section}.{key}"
    for section in ("data", "sampling", "lora", "scpo", "eval", "trainer", "logging")
    for key in (VALID.get(section) or {"x": 0})
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.sampled_from(["2001-13-45", ".inf"])
)
trees = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=12,
)
keys = st.one_of(
    st.sampled_from(KEYS), st.text(max_size=20), st.lists(st.sampled_from(KEYS + ["", "a"]), max_size=4).map(".".join)
)
override = st.one_of(
    st.text(max_size=40),
    st.tuples(keys, st.text(max_size=30)).map("=".join),
    st.tuples(keys, scalars).map(lambda kv: f"{kv[0]}={kv[1]}"),
)
documents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=300).map(str.encode),
    trees.map(lambda t: yaml.safe_dump(t).encode()),
    st.dictionaries(st.sampled_from([*VALID, "extra"]), trees, max_size=4).map(
        lambda d: yaml.safe_dump(VALID | d, allow_unicode=True).encode()
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents, overrides=st.lists(override, max_size=4))
def test_recipe_loader_raises_only_config_error(doc, overrides):
    from train.config import ConfigError, Recipe, load_recipe

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_bytes(doc)
        try:
            recipe = load_recipe(path, overrides)
        except ConfigError as e:
            assert str(e).strip(), "a ConfigError names the problem"
        else:
            assert isinstance(recipe, Recipe)


@pytest.mark.parametrize(
    "text,overrides",
    [
        (b"\xff\xfe not utf-8", []),
        (b"algorithm: scpo\noutput_dir: x\nseed: 2001-13-45\n", []),  # YAML timestamp that is no date
        ((ROOT / RECIPE).read_bytes(), ["seed=2001-13-45"]),
        ((ROOT / RECIPE).read_bytes(), ["data=[1]", "data.num_train=3"]),
    ],
)
def test_recipe_loader_regressions(tmp_path, text, overrides):
    from train.config import ConfigError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, overrides)
    assert str(path) in str(e.value) or "override" in str(e.value)


# ---------------------------------------------------------------- 6. secrets and serialisation formats


def _pickle_like(path: Path) -> bool:
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80" and head[1:2] in {bytes([p]) for p in range(2, 6)}:  # raw pickle protocol 2-5
        return True
    if head == b"PK\x03\x04":  # torch.save's zip format holds data.pkl
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".pkl") for n in z.namelist())
    return False


@pytest.mark.slow
def test_secrets_never_written_and_weights_are_safetensors(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    secrets = {"WANDB_API_KEY": "wk" + os.urandom(16).hex(), "HF_TOKEN": "hf_" + os.urandom(16).hex()}
    proc = run_to_end(
        tiny_scpo(tiny_model_dir, out, "eval.enabled=true", "logging.wandb=offline"),
        env=secrets | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "recipe.json").is_file() and list(out.rglob("*.wandb")), "the run wrote its recipe and wandb log"
    for name, value in secrets.items():
        assert value not in proc.stdout + proc.stderr, f"{name} in the logs"
        leaks = [str(p.relative_to(out)) for p in files if value.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert not [str(p.relative_to(out)) for p in files if _pickle_like(p)]
    adapter = out / "iter_1" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_exponent_overrides_are_floats():
    """YAML 1.1 reads `5e-6` as a string; `trainer:` is untyped, so TRL got text and crashed (found by the NaN test)."""
    from train.config import load_recipe

    recipe = load_recipe(ROOT / RECIPE, ["output_dir=x", "trainer.learning_rate=5e-6", "scpo.beta=1E-1"])
    assert recipe.trainer["learning_rate"] == 5e-6 and isinstance(recipe.trainer["learning_rate"], float)
    assert recipe.scpo.beta == 0.1
    assert load_recipe(ROOT / RECIPE, ["model=1e"]).model == "1e"


# ---------------------------------------------------------------- 7. crash-safe partial work (issue 13, section 2)
# SIGKILLs land at named points through SELFREWARD_FAULT (train/runtime/artifacts.py::fault); the pure parts
# (ChunkLog, staged publish, safetensors check, rank-count changes) are in tests/unit/test_chunklog.py.


def _chunks(path: Path) -> list[list[dict]]:
    """The rows of every chunk line of a partial file; fails on a torn or glued line."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path.name}: torn last line"
    return [json.loads(line)["rows"] for line in text.splitlines()]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_in_a_chunk_append_and_in_the_metrics_write_resume_without_loss(tiny_model_dir, tmp_path):
    """ScPO generate, 4 prompts in 2 chunks. (1) killed halfway through writing chunk 2: chunk 1 whole, then a torn
    line; (2) the rerun cuts the torn line, samples only the 2 missing prompts and is killed before generate's
    metrics are written: nothing published, both chunks whole, chunk 1 untouched; (3) the last run publishes those
    very rows without appending a chunk (it would be killed if it did)."""
    out = tmp_path / "o"
    it1 = out / "iter_1"
    partial = it1 / "samples.jsonl.rank0.partial"
    overrides = tiny_scpo(tiny_model_dir, out)
    proc = Proc(overrides, env={"SELFREWARD_FAULT": "chunk_append:samples.jsonl@2"})
    assert proc.finish() == -signal.SIGKILL, proc.stderr[-3000:]
    text = partial.read_text()
    assert text.count("\n") == 1 and not text.endswith("\n"), "chunk 1 whole, chunk 2 torn"
    first = json.loads(text.splitlines()[0])["rows"]
    assert not (it1 / "samples.jsonl").exists()

    proc = Proc(overrides, env={"SELFREWARD_FAULT": "phase_metrics:generate"})
    assert proc.finish() == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (it1 / "samples.jsonl").exists() and not (it1 / "phases" / "generate.json").exists()
    chunks = _chunks(partial)
    assert len(chunks) == 2 and chunks[0] == first, "chunk 1 kept as it was, chunk 2 appended on a clean line"
    assert {r["prompt_id"] for r in chunks[0]}.isdisjoint({r["prompt_id"] for r in chunks[1]})
    assert_no_torn_finals(out)

    last = run_to_end(overrides, env={"SELFREWARD_FAULT": "chunk_append:samples.jsonl"})
    assert "train took" in last.stderr
    rows = _rows(it1 / "samples.jsonl")
    assert rows == chunks[0] + chunks[1], "published exactly the finished chunks: nothing lost, redone or doubled"
    assert sorted((r["prompt_id"], r["sample"]) for r in rows) == sorted({(r["prompt_id"], r["sample"]) for r in rows})
    assert len(rows) == 4 * 2
    assert json.loads((it1 / "phases" / "generate.json").read_text())["metrics"]["samples"] == 8
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    assert_no_torn_finals(out)


@pytest.mark.slow
def test_sigkill_in_the_adapter_publish_and_a_truncated_adapter_are_redone(tiny_model_dir, tmp_path):
    """(1) killed while publishing the adapter (files fsync'd, not yet renamed): no adapter, no train metrics;
    (2) the rerun publishes a whole one; (3) an adapter left truncated (what a power loss after an unsynced rename
    could leave; a SIGKILL cannot, so the test cuts the file) is not taken as done: train runs again."""
    from train.runtime.artifacts import adapter_complete

    out = tmp_path / "o"
    it1 = out / "iter_1"
    adapter = it1 / "adapter"
    overrides = tiny_scpo(tiny_model_dir, out)
    proc = Proc(overrides, env={"SELFREWARD_FAULT": "commit_dir:adapter"})
    assert proc.finish() == -signal.SIGKILL, proc.stderr[-3000:]
    assert not adapter.exists() and not (it1 / "phases" / "train.json").exists()
    assert_no_torn_finals(out)
    run_to_end(overrides)
    assert adapter_complete(adapter) and (it1 / "phases" / "train.json").exists()
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    last = run_to_end(overrides)
    assert "iter 1: train ..." in last.stderr and "train done" not in last.stderr, last.stderr[-3000:]
    assert adapter_complete(adapter)
    assert_no_torn_finals(out)


@pytest.mark.slow
def test_sigkill_in_meta_rewarding_chunk_appends_resumes_without_loss(tiny_model_dir, tmp_path):
    """Self-Rewarding on the tiny model, 3 prompts x 2 responses, 2 per chunk: killed mid-append in generate, then
    in judge; each rerun keeps the finished chunk and redoes only the rest."""
    out = tmp_path / "o"
    it1 = out / "iter_1"
    overrides = [
        f"model={tiny_model_dir}",
        f"output_dir={out}",
        "sampling.engine=hf",
        "max_prompts=3",
        "iterations=1",
        "sampling.max_tokens=8",
        "sampling.batch_size=2",
        "meta_rewarding.num_responses=2",
        "meta_rewarding.num_judgements=2",
        "meta_rewarding.judge_max_tokens=16",
        "meta_rewarding.force_verdict=false",
        "eval.enabled=false",
    ]
    recipe = "recipes/self_rewarding/smollm2-135m-cpu.yaml"
    kept = {}
    for artifact, fault in (("responses.jsonl", "chunk_append:responses.jsonl@2"),
                            ("judgements.jsonl", "chunk_append:judgements.jsonl@2")):  # fmt: skip
        proc = Proc(overrides, recipe=recipe, env={"SELFREWARD_FAULT": fault})
        assert proc.finish() == -signal.SIGKILL, proc.stderr[-3000:]
        text = (it1 / f"{artifact}.rank0.partial").read_text()
        assert text.count("\n") == 1 and not text.endswith("\n"), "chunk 1 whole, chunk 2 torn"
        assert not (it1 / artifact).exists()
        kept[artifact] = json.loads(text.splitlines()[0])["rows"]
    proc = Proc(overrides, recipe=recipe, env={"SELFREWARD_FAULT": "phase_metrics:actor_pairs"})
    assert proc.finish() == -signal.SIGKILL, proc.stderr[-3000:]
    responses, judged = _rows(it1 / "responses.jsonl"), _rows(it1 / "judgements.jsonl")
    assert responses[:4] == kept["responses.jsonl"] and judged[:2] == kept["judgements.jsonl"]
    assert [(r["prompt_id"], r["response_idx"]) for r in responses] == [
        (r["prompt_id"], r["response_idx"]) for r in judged
    ]
    assert len({(r["prompt_id"], r["response_idx"]) for r in judged}) == len(judged) == 3 * 2
    assert all(len(r["judge_texts"]) == 2 for r in judged)
    assert not list(it1.glob("*.partial"))
    assert_no_torn_finals(out)


class _CharTokenizer:
    """The last message's characters as token ids, so the fake engine can read a rendered prompt back."""

    @staticmethod
    def apply_chat_template(conv, tokenize=True, add_generation_prompt=True):
        return [ord(c) for c in conv[-1]["content"]]


class _FakeEngine:
    """Deterministic sampler: responses, "Score: X" judgements and "Winner" verdicts from the prompt text; raises
    like a dead engine on call `die_at`."""

    tokenizer = _CharTokenizer()

    def __init__(self, die_at: int | None = None):
        self.die_at, self.calls = die_at, []

    def set_adapter(self, path):
        pass

    def generate(self, convs, params, desc=""):
        from train.engine import Sample

        self.calls.append(len(convs))
        if len(self.calls) == self.die_at:
            raise RuntimeError("engine died")
        out = []
        for conv in convs:
            h = sum(map(ord, conv[-1]["content"]))
            if desc == "meta-judge":  # the judgement with the higher score wins, in either order
                a, b = re.findall(r"Score: (\d)", conv[-1]["content"])[-2:]
                texts = ["Winner: Judgement " + ("A" if a > b else "B")]
            elif "judge" in desc:
                texts = [f"Score: {(h + 3 * j) % 6}" for j in range(params.n)]
            else:
                texts = [f"answer {h % 97} {'x' * j}" for j in range(params.n)]
            out.append([Sample(t, [1] * len(t), "stop") for t in texts])
        return out

    def generate_ids(self, prompt_ids, params, desc=""):
        return self.generate(
            [[{"role": "user", "content": "".join(map(chr, ids))}] for ids in prompt_ids], params, desc
        )


def test_meta_rewarding_phases_keep_finished_chunks_when_the_engine_dies(tmp_path, monkeypatch):
    """generate, judge and meta-judge: the engine dies on the 2nd call; the rerun calls it only for what the 1st
    chunk did not cover, and publishes byte for byte what an uninterrupted run publishes."""
    from train.algorithms.meta_rewarding import build_judge_pairs, generate_responses, judge_responses
    from train.config import Recipe
    from train.loop import Run

    monkeypatch.setattr("train.loop.resolve_model", lambda model: "unused")
    items = [{"id": f"p{i}", "prompt": f"What is {i} + {i}?"} for i in range(5)]

    def make_run(out: Path) -> Run:
        recipe = Recipe.model_validate({
            "algorithm": "meta_rewarding", "output_dir": str(out), "sampling": {"batch_size": 2},
            "meta_rewarding": {"num_responses": 3, "num_judgements": 3, "force_verdict": False},
        })  # fmt: skip
        return Run(recipe)

    steps = [
        ("responses.jsonl", lambda run: generate_responses(run, 1, items)),
        ("judgements.jsonl", lambda run: judge_responses(run, 1)),
        ("judge_pairs.jsonl", lambda run: build_judge_pairs(run, 1)),
    ]
    ref = make_run(tmp_path / "ref")
    ref._sampler = _FakeEngine()
    for _, step in steps:
        step(ref)
    run = make_run(tmp_path / "out")
    for artifact, step in steps:
        run._sampler = _FakeEngine(die_at=2)
        with pytest.raises(RuntimeError, match="engine died"):
            step(run)
        first = run._sampler.calls[0]
        assert not (run.iter_dir(1) / artifact).exists()
        run._sampler = _FakeEngine()
        metrics = step(run)
        if artifact == "responses.jsonl":
            assert first == 2 and sum(run._sampler.calls) == 3, "only the 3 prompts after chunk 1"
        elif artifact == "judgements.jsonl":
            assert first == 2 and sum(run._sampler.calls) == 5 * 3 - 2, "only the responses after chunk 1"
        else:
            assert first == 2 and sum(run._sampler.calls) == metrics["meta_comparisons"] - 2 > 0
        assert (run.iter_dir(1) / artifact).read_bytes() == (ref.iter_dir(1) / artifact).read_bytes(), artifact
        assert not list(run.iter_dir(1).glob(f"{artifact}.*partial"))
    assert _rows(run.iter_dir(1) / "judge_pairs.jsonl"), "the fake judge's scores vary: there are judge pairs"
