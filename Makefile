# ckaflow: the two commands of the README, plus helpers. Every target is idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE := 1

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Reinstall only when the project metadata changed since the last install.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	# editable: one plain path entry to the checkout (pyproject package-dir), imported by Dask workers started anywhere
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ckaflow demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/cka.py --quick
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf runs .prefect
