# make demo: train HT-GRPO on the tiny default, score it, compile the leaderboard (CPU, a few minutes).
# make test: the test suite. Both create or reuse .venv and install pinned versions (constraints.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean bench

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
	$(BIN)/harness eval --suite all --checkpoint harness/assets/tiny_base.safetensors --store runs/demo/store.sqlite
	$(BIN)/harness leaderboard --store runs/demo/store.sqlite --out runs/demo/leaderboard.md
	$(BIN)/harness leaderboard --store runs/demo/store.sqlite --out runs/demo/report.html --format html
	@echo "leaderboard: runs/demo/leaderboard.md   report: runs/demo/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/sampler_throughput.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs results
