# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (pip, not uv/poetry: only pip sees the local CPU torch wheel).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints-cpu.txt
STAMP := $(VENV)/.installed
# Project-local scratch space so runs do not litter /tmp or ~/.cache.
export TMP_ROOT := $(CURDIR)/.tmp
DEMO_DIR ?= $(CURDIR)/.demo
# This machine's pip config names find-links folders that do not exist; pip warns once per package.
PIP_NOISE := is ignored: it is neither a file nor a directory

.PHONY: venv demo test test-fast bench lint format lock clean submit browser gpu-check gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing the pinned CPU environment into $(VENV) (first run: a few minutes)"
	set -o pipefail; $(BIN)/python -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	set -o pipefail; $(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]" 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	@touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(TMP_ROOT)
	$(BIN)/python -m jobs.demo --out $(DEMO_DIR)

# The browser test (tests/test_browser.py) renders the HTML pages in headless Chromium: the
# Debian packages, installed here when missing (root, or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver with apt-get (the browser test needs them)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }

test: $(STAMP) browser
	@mkdir -p $(TMP_ROOT)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	@mkdir -p $(TMP_ROOT)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@mkdir -p $(TMP_ROOT)
	@for f in benchmarks/*.py; do [ $$f = benchmarks/gpu_check.py ] && continue; echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The prepared GPU check (benchmarks/gpu_check.py): real sizes on a CUDA machine, one JSON of
# figures in $(TMP_ROOT)/gpu_check/gpu_check.json. make test runs its CPU dry-run.
gpu-check: $(STAMP)
	@mkdir -p $(TMP_ROOT)
	$(BIN)/python benchmarks/gpu_check.py --out $(TMP_ROOT)/gpu_check

# Wheels for a GPU machine whose Python 3.12 image has torch, transformers' dependencies and
# accelerate but not our diffusers / DeepSpeed / pinned transformers (README, GPU check): the
# lock's versions for CPython 3.12 x86-64 into .whl/ (ignored); DeepSpeed, an sdist, is built here
# into a pure-Python wheel (no ops compiled: they are JIT-built where they run), dreamsim too.
GPU_WHEELS := diffusers transformers huggingface_hub tokenizers hf-xet safetensors pydantic pydantic_core \
  annotated-types typing-inspection hjson importlib_metadata httpx2 httpcore2 truststore click regex typer \
  filelock idna anyio h11 typing_extensions
# DreamSim (the image has torchvision, timm, peft, scipy) and what it needs beyond them; not in the
# CPU lock (no torchvision there): the versions pip resolved for dreamsim 0.2.1 on 2026-12-07
DREAMSIM_VERSION := 0.2.1
GPU_DREAMSIM_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	set -o pipefail; $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" $(CONSTRAINTS); done) 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	set -o pipefail; $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  -d .whl $(GPU_DREAMSIM_WHEELS) 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	set -o pipefail; $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w .whl \
	  "$$(grep '^deepspeed==' $(CONSTRAINTS))" dreamsim==$(DREAMSIM_VERSION) 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	@du -sh .whl

# Submit a job to a Ray cluster and follow it (exit status = the job's):
#   make submit RAY_ADDRESS=http://head:8265 ARGS="python -m jobs.train --config ... --set ray.address=auto"
submit: $(STAMP)
	$(BIN)/python infra/submit.py -- $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-resolve the lock from pyproject (run after changing dependencies; review the diff).
lock:
	rm -rf .lockvenv && $(PY) -m venv .lockvenv
	.lockvenv/bin/pip install -q "torch==2.13.0" && .lockvenv/bin/pip install -q -c <(echo torch==2.13.0) -e ".[dev]"
	{ sed -n '1,4p' $(CONSTRAINTS); .lockvenv/bin/pip freeze --exclude-editable | grep -v '^torch==' | { cat; echo torch==2.13.0; } | sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .lockvenv

clean:
	rm -rf .tmp .demo .pytest_cache build *.egg-info
