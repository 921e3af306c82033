#!/usr/bin/env bash
# Build the wheelhouse that scripts/gpu_smoke.py installs from on a GPU machine without network access:
#   scripts/build_wheelhouse.sh [DIR] [EXTRA_REQUIREMENT ...]     # DIR defaults to .wheelhouse (git-ignored)
# Such a machine has torch, transformers, peft, accelerate, pyarrow, pandas, xxhash, msgpack, ninja, einops,
# psutil and py-cpuinfo, so only what train/trainers/weighted_dpo.py, train/trainers/score_grpo.py (and their imports) and DeepSpeed need
# beyond those is fetched, each --no-deps and at the version this venv tests with: pure-Python wheels, plus
# cp312 manylinux x86_64 ones where a package is compiled (pydantic-core). pyarrow (52 MiB) is left out: pass
# e.g. pyarrow==26.0.1 as EXTRA for a machine without it. DeepSpeed ships only an sdist; it is built here into a
# pure-Python wheel without ops (DS_BUILD_OPS=0; ops JIT-compile on first use).
# PYTHON=path picks the interpreter whose installed versions are pinned (default .venv/bin/python); PY_VERSION
# (default 3.12, the GPU image's) the target Python of the compiled wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.wheelhouse}
shift || true
py=${PYTHON:-.venv/bin/python}
pyver=${PY_VERSION:-3.12}
tag=cp${pyver/./}
packages=(trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection hjson)

pin() { "$py" -c 'import importlib.metadata as m, sys; print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")' "$1"; }
pins=()
for p in "${packages[@]}"; do pins+=("$(pin "$p")"); done
ds=$(pin deepspeed)

rm -rf "$dir"  # one version of each package: two would make pip's --no-index install ambiguous
mkdir -p "$dir"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dir" "${pins[@]}" "$@"
# No build isolation: DeepSpeed's setup.py imports torch, and an isolated build would download a second one.
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$dir" "$ds"

for w in "$dir"/*.whl; do
  case $w in
    *-none-any.whl | *-"$tag"-*manylinux*x86_64*.whl) ;;
    *) echo "build_wheelhouse: $w is neither pure Python nor $tag manylinux x86_64" >&2; exit 1 ;;
  esac
done
ls -1 "$dir"
echo "wheelhouse $dir: $(du -sb "$dir" | cut -f1) bytes ($(du -sh "$dir" | cut -f1))"
