# gensynth. Two commands, each sets everything up on a fresh machine, then runs:
#   make demo   the main job end to end on Fashion-MNIST (Debian's dataset-fashion-mnist)
#   make test   the test suite (real gloo processes, real S3-protocol server, real Fashion-MNIST, and, as
#               root, a real one-host SLURM cluster that it starts before and stops after the tests)
#   make slurm-up / slurm-down   start / stop that dev cluster by hand (root; slurm/dev-cluster.sh)
#   make bench  the benchmarks; tables to stdout, JSON to bench/results/
#   make gpu-check  on a CUDA machine: every family in bf16 and fp16, resume, export, generation (bench/gpu.py)
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist
STAMP   := $(VENV)/.installed

.PHONY: setup system demo test lint bench gpu-check clean slurm-up slurm-down

# constraints.txt pins torch==2.13.0 (the CPU wheel on these machines) and the rest of the stack.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[s3,test]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import gensynth, torch, s3fs, moto" 
	touch $@

# Debian packages: installed when running as root, otherwise we say what is missing.
system:
	@if [ ! -d $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "missing $(FASHION): run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; \
	  fi; \
	fi
	@# headless Chromium: the evaluation test opens report.html in it and checks that every image loads
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "missing chromium: run 'sudo apt-get install chromium' (the report test skips without it, and fails under CI)" >&2; \
	  fi; \
	fi

setup: $(STAMP) system

# the family that measured best on this data (README, Quality on Fashion-MNIST): a VQ-VAE, then its prior
demo: setup
	$(BIN)/gensynth demo --config configs/vqvae_fashion.yaml --config configs/prior_fashion.yaml

lint: $(STAMP)
	$(BIN)/ruff check gensynth tests bench slurm

# As root, the SLURM dev cluster is started before pytest (unless it is already up) and stopped afterwards,
# by PID, whatever the tests did. Without root, the SLURM tests skip (fail under CI=true) and we say why.
test: setup lint
	@if slurm/dev-cluster.sh --status; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  trap 'slurm/stop-cluster.sh' EXIT; trap 'exit 130' INT TERM; \
	  slurm/dev-cluster.sh || echo "make test: the SLURM dev cluster did not start (see above)" >&2; \
	else \
	  echo "make test: the SLURM tests need the dev cluster: run 'sudo make slurm-up' (or sudo slurm/dev-cluster.sh) first" >&2; \
	fi; \
	$(BIN)/python -m pytest -q --durations=25 tests

slurm-up:
	slurm/dev-cluster.sh

slurm-down:
	slurm/stop-cluster.sh

bench: setup
	$(BIN)/python bench/loader.py --json bench/results/loader.json
	$(BIN)/python bench/skip.py --json bench/results/skip.json
	$(BIN)/python bench/train_overhead.py --json bench/results/train_overhead.json
	$(BIN)/python bench/cpu_bf16.py --json bench/results/cpu_bf16.json
	$(BIN)/python bench/generate.py --json bench/results/generate.json
	$(BIN)/python bench/generate.py --fast --json bench/results/generate_fast.json
	$(BIN)/python bench/scale.py --json bench/results/scale.json
	$(BIN)/python bench/finalize.py --json bench/results/finalize.json
	$(BIN)/python bench/quality.py --json bench/results/quality.json
	$(BIN)/python bench/purpose.py --json bench/results/purpose.json
	$(BIN)/python bench/purpose.py --families gan,prior --option filter_threshold --values 0,0.3,0.5,0.7,0.8 \
	    --purposes cas --num 10000 --json bench/results/purpose_filter.json

# Its own venv: torch from the package index (its CUDA build), not the CPU pin of constraints.txt.
GPU_VENV ?= .venv-gpu
gpu-check: system
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q -e ".[s3]"
	$(GPU_VENV)/bin/python bench/gpu.py --json bench/results/gpu.json

clean:
	rm -rf $(VENV) $(GPU_VENV) data runs reports bench/results .pytest_cache
