# finelap: `make demo` and `make test` do all set-up on a fresh machine (idempotent; create or reuse .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_out
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: demo test install system-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: an unpinned resolve pulls the CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "setuptools<81" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,scale]" "setuptools<81" "pandas<3"
	touch $(STAMP)

install: $(STAMP)

# Debian packages for the built-in sound pool; failure is reported, not fatal (the demo falls back).
system-deps:
	@bash scripts/system_deps.sh

demo: install system-deps
	$(BIN)/finelap corpus --out $(DEMO_DIR)/pool
	$(BIN)/finelap synth --pool $(DEMO_DIR)/pool/manifest.jsonl --out $(DEMO_DIR)/soundscapes --splits train=600,val=100,test=100 --seed 0

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
