# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install gradwise (no extras), train the bundled example on real data
#   make test   install everything (all extras, the frameworks), then lint and the whole test suite
#
# torch is installed first, pinned by TORCH, so that pip never pulls a multi-GB CUDA build on a CPU
# machine. GPU users override it, e.g.
#   make demo TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= all,dev,frameworks
BIN := $(VENV)/bin

.PHONY: install demo test lint format benchmarks clean

# gradwise itself: what the demo needs
$(VENV)/.base: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

# everything the tests exercise: tracking, tuning, deployment, PEFT, the other frameworks
$(VENV)/.installed: $(VENV)/.base
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.base
	$(BIN)/gradwise demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	sh scripts/ensure_chromium.sh  # the doctor's HTML report is checked in headless Chromium
	sh scripts/ensure_postgres.sh  # a local PostgreSQL server for the multi-machine tuning tests
	GRADWISE_REQUIRE_FRAMEWORKS=1 GRADWISE_REQUIRE_POSTGRES=1 $(BIN)/pytest --durations=30

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

benchmarks: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
