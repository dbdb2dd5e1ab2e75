# Quick start: `make serve` (service with the embedded default model), `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gprl-installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint format bench vllm-venv soak lm-run lm-compare lm-compare-gpu lm-judge compose-smoke clean

$(STAMP): pyproject.toml scripts/install.sh scripts/install_promtool.sh requirements/constraints-cpu.txt
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/gpm-server serve --host $(HOST) --port $(PORT)

# Lint and format check first (seconds), then the suite. pytest exits 5 when it collects nothing:
# that must fail, never pass silently (it does by default).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" -x -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The tiny-model run of docs/performance.md (two cores each); e.g. BENCH_ARGS="--model smollm2 --threads 1".
BENCH_ARGS ?= --model tiny --threads 1 --model-workers 2 --peer-threads 2
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

# Optional: vLLM in its own venv (.venv-vllm) for the bench's vLLM baseline (~3 min, ~1.5 GB).
vllm-venv:
	bash scripts/vllm_venv.sh

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

# GPRL on a real LM (SmolLM2-135M) through the service, on CPU (~tens of minutes on 2 cores).
lm-run: $(STAMP)
	$(BIN)/python -m benchmarks.lm_run

# GPRL vs scalar GRPO on SmolLM2-135M through the service (docs/gprl_runs.md; ~1 h on 2 cores).
# With the committed results in --out it only re-evaluates; pass LM_COMPARE_ARGS="--out DIR" to retrain.
# The held-out judge is the committed BT head (LM_JUDGE); `make lm-judge` retrains it.
LM_JUDGE ?= benchmarks/results/lm_compare/judge
LM_COMPARE_ARGS ?=
lm-compare: $(STAMP)
	$(BIN)/python -m benchmarks.lm_compare --judge $(LM_JUDGE) $(LM_COMPARE_ARGS)

# The same comparison at GPU scale (docs/gprl_runs.md, "on an H200"): all four arms, 4 trainers at
# once (six ran a 140 GiB H200 out of memory), plus the one-axis quiet run. Runs with GPU_PYTHON,
# an environment with CUDA torch and this package's server + trl extras (the .venv is CPU-only).
GPU_PYTHON ?= python
LM_GPU_OUT ?= lm_compare_gpu
LM_GPU_ARGS ?= --prompts-per-step 8 --max-completion-length 256
lm-compare-gpu:
	$(GPU_PYTHON) -m benchmarks.lm_compare.parallel --device cuda --jobs 4 \
	  --run "--out $(LM_GPU_OUT)/mix --judge $(LM_JUDGE) --steps 40 --n-train 160 --n-eval 128 \
	         --alpha-prompts 16 $(LM_GPU_ARGS)" \
	  --run "--out $(LM_GPU_OUT)/one_axis --prompt-set one_axis --steps 20 --n-train 8 --n-eval 4 \
	         --alpha-prompts 8 --arms gprl_paper gprl_project $(LM_GPU_ARGS)"

lm-judge: $(STAMP)
	$(BIN)/gpm-server train --backbone gguf:smollm2 --head bt --max-length 384 --seed 1 \
	  --val-frac 0.2 --data ../shared/data/alpacaeval-prefs/test.jsonl.gz:160 \
	  ../shared/data/hh-rlhf-harmless/test.jsonl.gz:160 --out $(LM_JUDGE) \
	  --features-dir $(HOME)/.cache/gprl/features

# `docker compose up` for real with podman on a Debian machine without Docker (as root: it may
# apt-get install podman): build, service + demo learner, checks, teardown; docs/deployment.md.
COMPOSE_SMOKE_ARGS ?=
compose-smoke: $(STAMP)
	$(BIN)/python scripts/compose_smoke.py $(COMPOSE_SMOKE_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm build dist *.egg-info
