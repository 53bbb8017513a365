# Each target sets up .venv (torch, the test tools, and pyeff itself built in place) first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export MAX_JOBS ?= 2
STAMP   = $(VENV)/.pyeff-built
SOURCES = setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test bench info clean setup

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . || \
	  (echo "pyeff: building the extension failed; see the compiler output above" >&2; exit 1)
	$(PY) -c "import pyeff._C"
	touch $@

demo: $(STAMP)
	$(PY) -m pyeff reproduce baseline

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pyeff bench

info: $(STAMP)
	$(PY) -m pyeff info

clean:
	rm -rf build *.egg-info pyeff/_C*.so
