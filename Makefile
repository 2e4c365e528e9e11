# One command for the main job (`make demo`), one for the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint unit redis bench clean lock docker-test

$(BIN)/fanout: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/fanout ## Create .venv and install fanout with its dev tools

redis: ## Start a local Redis if none answers
	@bash .ci/ensure-redis

demo: install redis ## The main job: sample photos resized and numbers doubled across workers
	$(BIN)/fanout demo

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install ## Unit tests only (no Redis needed)
	$(BIN)/pytest -m "not system"

test: lint redis ## Lint, then every test (unit and system)
	$(BIN)/pytest

bench: install redis ## Benchmarks beside their references (python -m bench --help for parameters)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# The image installs exactly these versions (runtime deps + the s3 extra, hashes included);
# re-run after changing pyproject.toml's dependencies. Existing pins are kept unless
# LOCK_ARGS=--upgrade (or --upgrade-package NAME) asks for newer ones.
lock: install ## Write requirements.lock from pyproject.toml (uv pip compile)
	$(BIN)/uv pip compile pyproject.toml --extra s3 --universal --python-version 3.11 \
		--generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_ARGS) -o requirements.lock

docker-test: install ## Only the compose stack under a real Docker engine (starts dockerd if needed)
	bash .ci/ensure-docker
	$(BIN)/pytest -m docker

clean:
	rm -rf $(VENV) fanout-demo bench-results .pytest_cache .mypy_cache .ruff_cache *.egg-info
