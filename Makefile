# Threat Bus developer tasks. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(patsubst %/setup.py,%,$(wildcard plugins/backbones/*/setup.py plugins/apps/*/setup.py))
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: help dev-mode run test lint format bench broker clean

help:
	@echo "make run       set up $(VENV) if needed and run a node (CONFIG=file, default: embedded in-memory setup)"
	@echo "make test      set up $(VENV) if needed, make sure RabbitMQ is up, run every test"
	@echo "make dev-mode  create $(VENV) with the core and every plugin installed in editable mode"
	@echo "make lint      ruff check and format check"
	@echo "make format    ruff format and autofix"
	@echo "make bench     run the benchmarks (benchmark/README.md)"
	@echo "make broker    start RabbitMQ at 127.0.0.1:5672 if it is down"

dev-mode: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements-dev.txt benchmark/requirements.txt $(addsuffix /setup.py,$(PLUGINS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -r benchmark/requirements.txt -e . \
		$(foreach plugin,$(PLUGINS),-e '$(plugin)[test]')
	touch $@

run: dev-mode
	$(BIN)/threatbus $(if $(CONFIG),-c $(CONFIG))

broker:
	./scripts/ensure-rabbitmq

test: dev-mode broker
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: dev-mode
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: dev-mode
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: dev-mode broker
	$(BIN)/python -m benchmark.run --out benchmark/results

clean:
	rm -rf $(VENV) build dist *.egg-info plugins/*/*/*.egg-info .pytest_cache .ruff_cache
