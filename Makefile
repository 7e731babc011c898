# make demo: train HT-GRPO on the tiny default, score it, compile the leaderboard (CPU, a few minutes).
# make test: the test suite. Both create or reuse .venv and install pinned versions (constraints.txt).
# make mmdet: GenEval's detector backend (compiles mmcv 2.1.0 once, ~10-20 min; pip caches the wheel after).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean bench mmdet

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[models,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/harness train --config configs/tiny/demo.yaml --run-dir runs/demo
	$(BIN)/harness eval --suite all --run runs/demo --store runs/demo/store.sqlite
	$(BIN)/harness eval --suite all --checkpoint harness/assets/tiny_base.safetensors --store runs/demo/store.sqlite --out runs/demo/eval
	$(BIN)/harness leaderboard --store runs/demo/store.sqlite --out runs/demo/leaderboard.md
	$(BIN)/harness leaderboard --store runs/demo/store.sqlite --out runs/demo/report.html --format html
	@echo "leaderboard: runs/demo/leaderboard.md   report: runs/demo/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# mmcv ships only an sdist: its build needs setuptools<81 (pkg_resources) and the venv's torch (no isolation).
# pip keeps the built wheel in ~/.cache/pip/wheels, so a later run installs it in seconds. Not part of `make test`:
# the mmdet tests skip where mmcv's compiled ops are missing.
MMCV_JOBS ?= 2
mmdet: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt "setuptools<81"
	$(BIN)/python -c "import mmcv._ext" 2>/dev/null || \
	  MMCV_WITH_OPS=1 MAX_JOBS=$(MMCV_JOBS) $(BIN)/pip install -c constraints.txt --no-build-isolation "mmcv==2.1.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[models,dev,mmdet]" "mmengine==0.10.7"

bench: $(STAMP)
	$(BIN)/python benchmarks/sampler_throughput.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs results
