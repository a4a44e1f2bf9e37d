# Set-up is part of every target: on a fresh machine `make quickstart` or `make test` creates
# .venv, installs the project with its test extra, then runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-all lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1: the pair that imports together here (see ENVIRONMENT notes)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/rlhf quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The README's test command: everything but the GPU tier.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .rlhf_cache .rlhf_runs mlflow.db mlartifacts quickstart_out runs bench_results
