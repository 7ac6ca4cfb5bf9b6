# Setup, tests and demo on a local virtual environment (.venv).
#
#   make demo   set up, then train Pyramid-Mamba for one epoch with the anomalib CLI (CPU, offline data)
#   make test   set up, then run the test suite (PYTEST_ARGS="-m 'not slow'" skips end-to-end tests)
#   make lint   ruff check
#   make setup  create .venv if missing and install the package with its dev extra
#
# The install is recorded in a stamp file whose name carries a hash of pyproject.toml and the
# constraints file: it re-runs only when one of them changes (or .venv is new).

PYTHON      ?= python3
VENV        ?= .venv
VENV_PY     := $(VENV)/bin/python
CONSTRAINTS ?= requirements/constraints-cpu.txt
PIP_FLAGS   ?= -qq --progress-bar off --disable-pip-version-check
PYTEST_ARGS ?=

INSTALL_HASH := $(shell cat pyproject.toml $(CONSTRAINTS) | sha256sum | cut -c1-16)
STAMP        := $(VENV)/.installed-$(INSTALL_HASH)

.PHONY: setup test demo lint clean-venv

setup: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(VENV_PY)
	@echo "Installing memmamba-plugins[dev] into $(VENV) (constraints: $(CONSTRAINTS)); the first run downloads several GB ..."
	@rm -f $(VENV)/.installed-*
	$(VENV_PY) -m pip install $(PIP_FLAGS) -c $(CONSTRAINTS) -e ".[dev]"
	$(VENV_PY) -m pip check
	@touch $@

test: setup
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV_PY) tools/demo.py

lint: setup
	$(VENV_PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
