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
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "setuptools<81" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,scale]" "setuptools<81" "pandas<3"
	@# the pretrained aisfx audio tower: finelap reads only its weight file (the package pins numpy 1.23 / librosa 0.9)
	$(BIN)/pip install -q --no-deps aisfx==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian packages for the built-in sound pool; failure is reported, not fatal (the demo falls back).
system-deps:
	@bash scripts/system_deps.sh

demo: install system-deps
	$(BIN)/finelap corpus --out $(DEMO_DIR)/pool --sample-rate 44100
	@# recordings are split as for 500/120/100 soundscapes; train then mixes 2000 from its share
	$(BIN)/finelap synth --pool $(DEMO_DIR)/pool/manifest.jsonl --out $(DEMO_DIR)/soundscapes --splits train=2000,val=120,test=100 \
	  --split-fractions train=500,val=120,test=100 --seed 0 --sample-rate 44100
	@if [ -f $(DEMO_DIR)/run/final/model.safetensors ]; then \
	  echo "finelap demo: reusing the trained checkpoint $(DEMO_DIR)/run/final (make clean to retrain)"; \
	else \
	  $(BIN)/finelap train --config configs/demo.yaml train.out_dir=$(DEMO_DIR)/run \
	    "data.train=[$(DEMO_DIR)/soundscapes/train/manifest.jsonl,$(DEMO_DIR)/soundscapes/train/sources.jsonl]" \
	    "data.val=[$(DEMO_DIR)/soundscapes/val/manifest.jsonl]"; \
	fi
	$(BIN)/finelap eval sed --checkpoint $(DEMO_DIR)/run/final --data $(DEMO_DIR)/soundscapes/test/manifest.jsonl --out $(DEMO_DIR)/report/sed.json
	$(BIN)/finelap eval retrieval --checkpoint $(DEMO_DIR)/run/final --data $(DEMO_DIR)/soundscapes/test/manifest.jsonl --out $(DEMO_DIR)/report/retrieval.json
	@# grounding example: the first reference event of the first test soundscape (whatever the pool rendered)
	q=$$($(BIN)/python -c "import json; print(json.loads(open('$(DEMO_DIR)/soundscapes/test/manifest.jsonl').readline())['events'][0]['label'])"); \
	  $(BIN)/finelap ground $(DEMO_DIR)/soundscapes/test/audio/test_000000.flac "$$q" --checkpoint $(DEMO_DIR)/run/final \
	    --reference $(DEMO_DIR)/soundscapes/test/strong.tsv --plot $(DEMO_DIR)/report/ground_example.png
	@echo "finelap demo: done."
	@echo "  checkpoint:      $(DEMO_DIR)/run/final  (training curves: $(DEMO_DIR)/run/training_curves.png)"
	@echo "  reports:         $(DEMO_DIR)/report/sed.md, $(DEMO_DIR)/report/retrieval.md (+ PNGs next to them)"
	@echo "  grounding plot:  $(DEMO_DIR)/report/ground_example.png"

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
