# The README's two commands: `make demo` and `make test`. Each creates .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ropo-ray-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration lint clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/ropo_full.py

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
