# Quick start: `make demo` generates text, `make test` runs every test. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is only the test extra's reference implementation (transformers); 2.13.0 is the CPU
# build that this project's machines keep on disk, so the install downloads no CUDA wheels.
TORCH := torch==2.13.0

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.installed: setup.py $(VENV)/.created
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]' '$(TORCH)'
	touch $@

.PHONY: demo test
# The default model (jserve/default_model, trained by tools/train_default_model.py) completes Python.
demo: $(VENV)/.installed
	$(VENV)/bin/jserve generate --prompt="$$(printf 'import os\n\n\ndef read_lines(path):')" --max_tokens=64

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests
