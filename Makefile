# Two commands on a fresh machine with Python 3.11: each sets everything up on first use (./.venv), then runs.
VENV ?= .venv
export VENV

.PHONY: setup quickstart test lint
setup:
	@bash scripts/setup.sh

quickstart: setup  ## the README quickstart: offline, a few minutes on 2 CPU cores
	$(VENV)/bin/fedlight fit --config configs/quickstart.yaml

test: setup  ## the test suite (CI runs exactly this)
	$(VENV)/bin/python -m pytest -q

lint: setup  ## ruff and mypy, as CI runs them
	$(VENV)/bin/ruff check src plugins
	$(VENV)/bin/ruff format --check src plugins
	$(VENV)/bin/mypy src/fedlight
