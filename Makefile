# The README's two commands: `make serve` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HF_HUB_OFFLINE ?= 1

.PHONY: serve test lint bench install-serve install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel

# Serving needs no torch: the base dependencies only.
$(VENV)/.stamp-serve: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

# Tests train and export tiny models, so they need the train and dev extras.
$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[train,dev]'
	touch $@ $(VENV)/.stamp-serve

install-serve: $(VENV)/.stamp-serve
install-dev: $(VENV)/.stamp-dev

serve: $(VENV)/.stamp-serve
	$(VENV)/bin/cxr-triage serve --host $(HOST) --port $(PORT)

test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.stamp-dev
	$(PY) benchmarks/serve_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
