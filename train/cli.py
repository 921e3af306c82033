"""`selfreward` command line: run, eval, validate, docs.

User mistakes (recipe, override, data file) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from train.config import ALGORITHMS, ConfigError, Recipe, load_recipe
from train.config.preflight import preflight

EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 1, 130


def _algorithm(name: str):
    """The algorithm's entry point, from the one table in train/config/schema.py."""
    import importlib

    module, _, function = ALGORITHMS[name].entry.partition(":")
    return getattr(importlib.import_module(module), function)


def _table(rows: list[dict[str, Any]]) -> str:
    from train.evaluate import format_judge_table, format_table

    return format_judge_table(rows) if "judge_agreement" in rows[0] else format_table(rows)


def _print_eval_table(out: Path) -> None:
    from train.runtime.artifacts import read_json

    rows = []
    for k in range(0, 1000):
        path = out / f"iter_{k}" / "eval.json"
        if not path.exists():
            if k > 0:
                break
            continue
        rows.append({"checkpoint": "base" if k == 0 else f"iter_{k}"} | read_json(path))
    if rows:
        print(f"\nHeld-out evaluation ({out})\n{_table(rows)}")


def cmd_run(recipe: Recipe, redo: list[str] | None = None, exit_after: bool = False) -> int:
    """`exit_after`: the process ends when this returns (`entry`), so the engine skips returning its memory."""
    from train.errors import StopRun
    from train.loop import Run

    run = Run(recipe)
    if run.is_main:  # the recipe of the last `run` (`eval` leaves it alone); secrets redacted (recipe_to_dict)
        from train.config import recipe_to_dict
        from train.runtime.artifacts import write_json

        write_json(run.out / "recipe.json", recipe_to_dict(recipe))
    run.redo = set(redo or [])
    if recipe.logging.wandb and run.is_main:  # one tracker, on rank 0 (it owns wandb_run_id.txt)
        from train.runtime.tracking import Tracker

        run.tracker = Tracker(recipe)
    try:
        _algorithm(recipe.algorithm)(run)
    except StopRun as e:
        print(f"selfreward: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        if run.tracker is not None:
            run.tracker.finish()
        from train.engine import close_sampler

        close_sampler(release_memory=not exit_after)  # vLLM's own exit hook would wait ~5 s longer for its worker
        from train.runtime import distributed as dist

        dist.shutdown()
    if run.is_main:
        _print_eval_table(run.out)
        print(f"\nartifacts: {run.out}")
    return 0


def eval_checkpoints(run: Any) -> list[tuple[str, Any]]:
    """What `selfreward eval` measures, in order: the base model, the SFT seed adapter when the run trained one
    (`sft.enabled`: iteration 1 starts from it, iter_0/adapter), then each whole iteration adapter until the first
    missing one."""
    checkpoints: list[tuple[str, Any]] = [("base", None)]
    if run.adapter(0) is not None:
        checkpoints.append(("sft", run.adapter(0)))
    k = 1
    while run.adapter(k) is not None:
        checkpoints.append((f"iter_{k}", run.adapter(k)))
        k += 1
    return checkpoints


def cmd_eval(recipe: Recipe, data: str | None) -> int:
    """Evaluate the base model, the SFT seed (if any) and every saved iteration adapter; rewrite output_dir/eval.jsonl."""
    from train.evaluate import evaluate
    from train.loop import Run
    from train.runtime.artifacts import write_jsonl

    judge = recipe.algorithm in ("meta_rewarding", "self_rewarding")
    if judge:
        from train.evaluate import judge_agreement, read_labelled_pairs

        path = data or recipe.meta_rewarding.judge_eval_file
        if not path:
            raise ConfigError("no labelled pairs: set meta_rewarding.judge_eval_file or pass --data FILE.jsonl")
        read_labelled_pairs(path)  # a bad file fails before output_dir is touched
        measure = lambda run, adapter: judge_agreement(run.sharded_sampler, adapter, path, recipe)  # noqa: E731
    else:
        from train.data import load_items, read_prompt_file

        items = (
            read_prompt_file(data, recipe.data, need_answer=True) if data else load_items(recipe.data, recipe.seed)[1]
        )
        if not items:
            raise ConfigError("no eval split: set data.eval_file or pass --data FILE.jsonl")
        measure = lambda run, adapter: evaluate(run.sharded_sampler, adapter, items, recipe)  # noqa: E731
    run = Run(recipe)
    rows = [{"checkpoint": name} | measure(run, adapter) for name, adapter in eval_checkpoints(run)]
    if run.is_main:
        write_jsonl(run.out / "eval.jsonl", rows)
        print(_table(rows))
        print(f"\nwrote {run.out / 'eval.jsonl'}")
    return 0


def cmd_status(target: str, overrides: list[str]) -> int:
    """Per iteration, each phase's state (done / stale / missing) and why, without running or writing anything."""
    from train.loop import Run

    path = Path(target)
    if path.is_dir():
        if not (path / "recipe.json").is_file():
            raise ConfigError(f"{path}: no recipe.json (not a selfreward output_dir)")
        recipe = Recipe.model_validate(json.loads((path / "recipe.json").read_text()) | {"output_dir": str(path)})
    else:
        recipe = load_recipe(path, overrides)
    run = Run(recipe, dry_run=True)
    _algorithm(recipe.algorithm)(run)
    print(f"{'iter':<6}{'phase':<13}{'state':<9}why")
    for row in run.status:
        print(f"{row['iteration']:<6}{row['phase']:<13}{row['state']:<9}{row['why']}")
    return 0


def cmd_validate(args: list[str]) -> int:
    """`validate R1.yaml [R2.yaml ...] [key.sub=value ...]`: the overrides apply to every recipe. Checks all that
    `run` checks before writing, except output_dir (the run may happen on another machine)."""
    overrides = [a for a in args if "=" in a and not Path(a).is_file()]
    recipes = [a for a in args if a not in overrides]
    if not recipes:
        raise ConfigError("validate: no recipe file given (arguments with `=` are overrides)")
    for path in recipes:
        preflight(load_recipe(path, overrides), output_dir=False)
        print(f"ok  {path}")
    return 0


def cmd_docs(out: str | None) -> int:
    from train.config.reference import render_reference

    text = render_reference()
    if out:
        try:
            Path(out).write_text(text)
        except OSError as e:  # a missing folder, a directory, no permission
            raise ConfigError(f"docs --out {out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {out}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfreward", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a recipe; phases whose inputs changed are redone")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.temperature=0.8")
    run.add_argument("--redo", action="append", metavar="PHASE", default=[],
                     help="redo PHASE (e.g. pairs, or 2:pairs for iteration 2 only) and what depends on it")  # fmt: skip
    st = sub.add_parser("status", help="which phases of a run are done, stale or missing, and why")
    st.add_argument("target", help="an output_dir (uses its recipe.json) or a recipe YAML")
    st.add_argument("overrides", nargs="*", help="dotted overrides (with a recipe YAML)")
    ev = sub.add_parser("eval", help="evaluate the base model and every saved iteration adapter")
    ev.add_argument("recipe")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, as for run")
    ev.add_argument("--data", help="JSONL with `prompt` and `answer` rows (default: the recipe's eval split)")
    val = sub.add_parser("validate", help="check recipes against the schema without running them")
    val.add_argument("recipes", nargs="+", metavar="RECIPE [key.sub=value ...]",
                     help="recipe files, then dotted overrides (applied to every recipe given)")  # fmt: skip
    docs = sub.add_parser("docs", help="print the recipe key reference (markdown)")
    docs.add_argument("--out")
    rep = sub.add_parser("report", help="write OUTPUT_DIR/report.html (plots, metrics, sample pairs)")
    rep.add_argument("output_dir")
    return p


_SIGNALLED: list[int] = []  # signals received; set before the KeyboardInterrupt is raised


def _raise_interrupt(signum, frame):  # SIGTERM from SLURM/preemption takes the Ctrl-C path
    # SLURM signals every process of the job: a second TERM mid-shutdown must not interrupt the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, exit_after: bool = False) -> int:
    """The CLI. `exit_after=True` (`entry`): the process ends right after, so nothing is cleaned up for later."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from train.runtime.progress import progress_enabled

    if not progress_enabled():  # no download / weight-loading bars under CI or without a terminal
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers at import
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # TRL's dataset map/tokenize bars
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[selfreward] %(message)s"))
    log = logging.getLogger("selfreward")
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            return cmd_validate(args.recipes)
        if args.command == "status":
            return cmd_status(args.target, args.overrides)
        if args.command == "docs":
            return cmd_docs(args.out)
        if args.command == "report":
            from train.report import write_report

            print(write_report(args.output_dir))
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe)  # every check that needs no model, before anything is written
        from train.config import check_launch
        from train.runtime import distributed as dist

        check_launch(recipe, dist.world_size())
        dist.configure(recipe.distributed_timeout_s)  # before anything creates the process group
        dist.share_cpu_threads()  # before an in-process vLLM-CPU engine pins torch's thread count
        if args.command == "run":
            return cmd_run(recipe, args.redo, exit_after)
        return cmd_eval(recipe, args.data)
    except ConfigError as e:
        print(f"selfreward: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("selfreward: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        # A library can turn the KeyboardInterrupt into its own error (transformers' lazy import raises
        # ModuleNotFoundError when the signal lands mid-import): after a SIGTERM this is still an interruption.
        if not _SIGNALLED:
            raise
        print("selfreward: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def end_process(code: int) -> None:
    """End a finished `selfreward` process cheaply, with status `code`; call it only when nothing runs after it.

    Closes an engine still open (`eval`) without handing its memory back, joins non-daemon threads and runs the
    atexit hooks (wandb's, logging's, vLLM's) as the interpreter would, then exits without interpreter teardown:
    tearing down the modules of torch, vLLM and TRL (about 6,000) runs full garbage collections over the whole heap
    for 3-5 s on a 2-core box (docs/results.md, issue 15), and leaves nothing behind that the hooks and the writers
    have not already flushed (artifacts are fsynced and renamed, the tracker finished, in `cmd_run`). After an
    interrupt the hooks are skipped too: cleanup already ran in `main`, and CPython's exit path for a caught
    KeyboardInterrupt was seen to end the process by SIGINT (status -2, not 130) in tests/algorithms/test_faults.py.
    """
    import atexit
    import threading

    if code != EXIT_INTERRUPTED:
        engine = sys.modules.get("train.engine")  # loaded only by commands that sample
        if engine is not None:
            engine.close_sampler(release_memory=False)
        threading._shutdown()  # what interpreter exit does first: wait for non-daemon threads
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    end_process(main(exit_after=True))
