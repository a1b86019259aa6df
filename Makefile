# make demo  - install into .venv and run the quickstart sweep on the embedded toy world
# make test  - install into .venv (with dev tools) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test lint bench install clean

$(VENV)/bin/activate:
	python3 -m venv $(VENV)

# torch first, pinned: the CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
$(VENV)/.torch: $(VENV)/bin/activate
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/attack-sweep demo

test: install
	$(PY) -m pytest -q -m "not slow and not gpu"


lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/overhead.py
	$(PY) bench/adversary.py

clean:
	rm -rf $(VENV) .attack-sweep reports mlflow.db
