# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
# Both create .venv when missing and install fedpath with its dev extras into it.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpath-installed

.PHONY: install browser demo test lint typecheck unit clean

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

# Two pytest workers on two cores: the slowest tests wait on Flower (a SuperNode polls every 3 s, a killed site
# is noticed after two 30 s heartbeats), so a second worker fills the idle time; but the suite keeps both cores
# 92-98 % busy (measured), mostly in processes Flower starts (a ClientApp process per message at a deployed
# site, Ray actors, simulation processes), so three workers were slower (11 min 32 s against 10 min 7 s). Tests
# are dealt one by one, except the modules that share an expensive fixture, each kept in one worker (a scheduler
# in tests/conftest.py): whole modules for every module (--dist loadscope) left one worker idle while the other
# ran the deployment module's scenarios one after another.
PYTEST_WORKERS ?= 2
unit: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist load --durations=12

# The report test renders report.html in headless Chromium (Debian's package): installed here when missing and
# this account may install packages (root, or sudo without a password); otherwise that test says what to do.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Chromium (Debian package) for the report test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then \
		echo "installing Chromium (Debian package) for the report test"; \
		sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: no Chromium and no way to install it here: the report's browser test will fail (apt-get install chromium)"; fi

test: lint typecheck unit

clean:
	rm -rf .typecheck .mypy_cache .pytest_cache .ruff_cache build *.egg-info runs
