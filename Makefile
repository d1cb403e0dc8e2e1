# The two commands of the README. Both set up a fresh machine first
# (launch/install.sh: Debian's Open MPI, torch 2.13.0 CPU, Horovod built for it);
# on a ready machine that step only verifies, in seconds.
# TORCH=2.14 or TORCH=2.15 installs that torch instead, with Horovod built for it.
VENV ?= .venv
TORCH ?=
PYTHON := $(VENV)/bin/python
NP ?= 4

.PHONY: install test test-fast demo lint docs

install:
	$(if $(TORCH),TORCH_VERSION=$(TORCH) )bash launch/install.sh

# Everything: unit, property and multi-rank tests (each multi-rank launch has a timeout).
test: install
	$(PYTHON) -m pytest -q -ra tests

# Only the single-process tests (under a minute): every test that starts a
# launcher is marked mpi, which tests/conftest.py enforces.
test-fast: install
	$(PYTHON) -m pytest -q -m "not mpi" tests

# The main job: plain Horovod, then DBS, on two ranks, the second under a CPU quota of a
# quarter core (launch/hetero_ranks.py; the in-framework emulation where cgroups are not
# writable); ends with each run's training time and accuracy, and the ratio.
demo: install
	$(PYTHON) launch/demo.py

# Lint the package (the library and dbs_hvd.train): ruff (rules in ruff.toml),
# its formatting, and mypy (settings in setup.cfg), every file held to them.
lint: install
	$(VENV)/bin/ruff check dbs_hvd
	$(VENV)/bin/ruff format --check dbs_hvd
	$(VENV)/bin/mypy

# The documentation site (mkdocs, config in mkdocs.yml) into build/site;
# --strict turns every warning into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict
