# Each target sets up .venv on first use (CPU torch wheel first, then the project), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test quickstart setup

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,deepspeed,gguf]'
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/purify bench

quickstart: $(STAMP)
	$(VENV)/bin/purify train recipes/quickstart.yaml

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q
