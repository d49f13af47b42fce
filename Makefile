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
# Until the trained default model ships, the demo writes a small random checkpoint first.
DEMO_MODEL := demo_model
$(DEMO_MODEL)/config.json: $(VENV)/.installed
	$(PY) -m tools.make_random_checkpoint --preset=tiny-llama --out=$(DEMO_MODEL)

demo: $(DEMO_MODEL)/config.json
	$(VENV)/bin/jserve generate --model=$(DEMO_MODEL) --prompt='def fibonacci(n):' --max_tokens=48 \
	  --max_num_batched_tokens=256 --max_model_len=1024

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 tests
