# Two entry points (README): `make reproduce` and `make test`. Both set up the venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup reproduce test notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (pinned in pyproject) is the CPU build that lies on the local disk
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

reproduce: setup
	$(VENV)/bin/fs3d reproduce

test: setup
	# figures of the quick-mode notebook runs go to runs/, never over the committed full-size figures/
	FS3D_FIGURES=$(CURDIR)/runs/test-figures FS3D_QUICK=1 MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --nbmake --nbmake-timeout=1800 --durations=30 notebooks tests

notebooks: setup
	$(PY) -m jupytext --sync notebooks/*.py

clean:
	rm -rf $(VENV) runs .pytest_cache
