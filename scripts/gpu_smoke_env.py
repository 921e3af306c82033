"""The environment half of scripts/gpu_smoke.py: what a bare GPU machine (torch, transformers, peft, accelerate, no
network) lacks is installed from a wheelhouse (scripts/build_wheelhouse.sh) into a folder of its own, and the versions
of what ran are reported."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

# import name -> distribution: what the project's trainers and DeepSpeed import beyond a torch+transformers image.
NEEDED = {"trl": "trl", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
          "pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
          "typing_inspection": "typing-inspection", "hjson": "hjson", "deepspeed": "deepspeed"}  # fmt: skip
VERSIONS = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "deepspeed",
    "pydantic",
    "pyarrow",
    "fsspec",
    "huggingface_hub",
)


def install_missing(wheelhouse: Path, site_dir: Path) -> tuple[list[str], str | None]:
    """pip-install (no index, no deps) the needed distributions this interpreter lacks into `site_dir`, and use it.
    Returns what was missing and, if installing failed, why (the stages that need it then fail on their import)."""
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    error = None
    if missing and not wheelhouse.is_dir():
        error = f"no wheelhouse at {wheelhouse} (scripts/build_wheelhouse.sh)"
    elif missing:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "--find-links", str(wheelhouse), "--target", str(site_dir), *missing]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stdout + res.stderr, end="")
        if res.returncode:
            error = ([s for s in res.stderr.splitlines() if s.strip()] or [f"pip exit {res.returncode}"])[-1][:500]
    # Appended after the interpreter's own site-packages: nothing here shadows what the machine has. The folder's
    # name holds "site-packages" because dill (datasets' fingerprints) pickles modules from elsewhere by value.
    if site_dir.is_dir():
        site.addsitedir(str(site_dir))
        importlib.invalidate_caches()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site_dir)]))
    if error:
        print(f"gpu_smoke: installing {missing} failed: {error}")
    return ([] if error else missing), error


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
