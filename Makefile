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

.PHONY: setup demo test test-deps lint clean

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

# System packages some tests need, from the distribution (Debian/Ubuntu): Chromium, which opens the run
# report headless (tests/test_run_report.py; that test is skipped without it). Installs only what is
# missing, only as root or with password-less sudo; otherwise says what to run. CI runs it before `make test`.
test-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "test-deps: chromium present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps: no apt-get; install Chromium yourself (or set TUNER_CHROMIUM) or the browser test is skipped"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	elif sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	else \
	  echo "test-deps: chromium missing; run 'sudo apt-get install chromium' or the browser test is skipped"; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check tuner tests
	$(PY) -m mypy tuner

clean:
	rm -rf $(VENV) out
