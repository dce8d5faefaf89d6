# gensynth. Two commands, each sets everything up on a fresh machine, then runs:
#   make demo   the main job end to end on Fashion-MNIST (Debian's dataset-fashion-mnist)
#   make test   the test suite (real gloo processes, real S3-protocol server, real Fashion-MNIST)
#   make bench  the benchmarks; tables to stdout, JSON to bench/results/
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist
STAMP   := $(VENV)/.installed

.PHONY: setup system demo test lint bench clean

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

demo: setup
	$(BIN)/gensynth demo --config configs/gan_fashion.yaml

lint: $(STAMP)
	$(BIN)/ruff check gensynth tests bench

test: setup lint
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/loader.py --json bench/results/loader.json
	$(BIN)/python bench/train_overhead.py --json bench/results/train_overhead.json
	$(BIN)/python bench/generate.py --json bench/results/generate.json
	$(BIN)/python bench/quality.py --json bench/results/quality.json

clean:
	rm -rf $(VENV) data runs reports bench/results .pytest_cache
