# make demo  - fresh venv, install, fine-tune on ELPV solar cells, export, serve, ask it once
# make test  - fresh venv, install with the dev extras, lint, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheels this project is tested with; override on machines that need other builds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: venv demo test lint clean

# -qq on the project's own install: errors only. setuptools warns there that a folder named
# like the package (convtune/, which is the package) may shadow it.
venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install -qq -e ".[dev,weights]"

demo: venv
	$(BIN)/pip install -qq -e ".[dev,weights,demo]"
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(BIN)/pytest -q --durations=15

clean:
	rm -rf runs .pytest_cache
