# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv when missing and install fedpath with its dev extras into it.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpath-installed

.PHONY: install demo test lint typecheck unit clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpath demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot see through setuptools' editable import hook, so it checks the package through a link tree
# that mirrors the installed layout (fedpath/common -> common, ...).
typecheck: $(STAMP)
	mkdir -p .typecheck/fedpath
	for room in common client server simulation; do ln -sfn ../../$$room .typecheck/fedpath/$$room; done
	MYPYPATH=.typecheck $(BIN)/mypy -p fedpath
	MYPYPATH=.typecheck $(BIN)/mypy benchmarks

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

clean:
	rm -rf .typecheck .mypy_cache .pytest_cache .ruff_cache build *.egg-info runs
