# The two commands of the README. Both set up a fresh machine first
# (launch/install.sh: Debian's Open MPI, torch 2.13.0 CPU, Horovod built for it);
# on a ready machine that step only verifies, in seconds.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
NP ?= 4

.PHONY: install test test-fast demo lint docs

install:
	bash launch/install.sh

# Everything: unit, property and multi-rank tests (each multi-rank launch has a timeout).
test: install
	$(PYTHON) -m pytest -q -ra tests

# Only the single-process tests (under a minute): every test that starts a
# launcher is marked mpi, which tests/conftest.py enforces.
test-fast: install
	$(PYTHON) -m pytest -q -m "not mpi" tests

# The main job: DBS on $(NP) local ranks, one emulated 3x slower, bundled digits data.
DEMO_FLAGS = --model cnn --slowdown 1,1,1,3 --epochs 15 --global-batch 64 --lr 0.1 --log runs/demo.jsonl
demo: install
	LAUNCHER=mpirun bash launch/run_local.sh $(NP) $(DEMO_FLAGS)

# Lint the package: ruff (rules in ruff.toml), its formatting, and mypy (settings
# in setup.cfg). Files still being cleaned are listed as PENDING in both.
lint: install
	$(VENV)/bin/ruff check dbs_hvd
	$(VENV)/bin/ruff format --check dbs_hvd
	$(VENV)/bin/mypy

# The documentation site (mkdocs, config in mkdocs.yml) into build/site;
# --strict turns every warning into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict
