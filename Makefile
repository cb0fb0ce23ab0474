# The README's two commands: `make demo` and `make test`. Each creates .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ropo-ray-installed
PYTEST_ARGS ?=

.PHONY: setup demo submit test test-unit test-integration lint clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/ropo_full.py

# The same job on a running Ray cluster (its dashboard address): make submit RAY_ADDRESS=http://127.0.0.1:8265
submit: $(STAMP)
	$(VENV)/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . -- python pipelines/ropo_full.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	ROPO_REQUIRE_CHROMIUM=1 $(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
