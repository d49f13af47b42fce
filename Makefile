# Quick start: `make demo` generates text, `make test` runs every test. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is only the test extra's reference implementation (transformers); 2.13.0 is the CPU
# build that this project's machines keep on disk, so the install downloads no CUDA wheels.
TORCH := torch==2.13.0

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' '$(TORCH)'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/jserve generate --prompt='def fibonacci(n):' --max_tokens=48

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests
