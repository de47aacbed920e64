# Entry points (see README): `make demo`, `make test` and `make lint`. Each creates .venv first.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch==2.13.0 is pinned (constraints.txt): an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

.PHONY: venv demo test lint bench
venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/internal-policy profile --out runs/demo --plot

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n 2 -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python bench/profile_speed.py
