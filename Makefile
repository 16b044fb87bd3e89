# Two commands do everything on a fresh machine:
#   make demo   -> set up .venv and run the main job on the embedded tiny base
#   make test   -> set up .venv and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
# torch is pinned so pip takes one exact wheel (a local CPU build on our dev/CI machines; the
# default CUDA build from PyPI on a Linux GPU box). If your venv already has a torch you want,
# run `make TORCH_SPEC= setup` and it is left alone (pyproject only asks for torch>=2.4).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuner-installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuner demo --out out/demo

test: $(STAMP)
	$(PY) -m ruff check tuner tests
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check tuner tests
	$(PY) -m mypy tuner

clean:
	rm -rf $(VENV) out
