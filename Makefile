# Each target sets up .venv (torch, the test tools, and pyeff itself built in place) first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export MAX_JOBS ?= 2
STAMP   = $(VENV)/.pyeff-built
SOURCES = setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test bench info clean setup sanitize

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

# The check to run before a release: the C++ extension built with AddressSanitizer + UBSan out of
# tree (build/sanitize/, the in-place pyeff/_C*.so is untouched), then the op tests against that build.
SAN_DIR   = build/sanitize
SAN_CXX   = -fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g -O1
SAN_LD    = -fsanitize=address,undefined
SAN_TESTS = tests/test_fake_quant.py tests/test_quant_conv.py tests/test_masked_conv.py tests/test_bad_input.py \
            $(wildcard tests/test_cpu_paths.py tests/test_fuzz_*.py)
SAN_ENV   = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
            ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
            PYTHONPATH=$(SAN_DIR)/site PYTHONDONTWRITEBYTECODE=1

sanitize: $(VENV)/.deps
	PYEFF_NO_CUDA=1 PYEFF_EXTRA_CXXFLAGS="$(SAN_CXX)" PYEFF_EXTRA_LDFLAGS="$(SAN_LD)" \
	  $(PY) setup.py -q build_ext --build-lib $(SAN_DIR)/lib --build-temp $(SAN_DIR)/tmp
	rm -rf $(SAN_DIR)/site && mkdir -p $(SAN_DIR)/site
	cp -r pyeff $(SAN_DIR)/site/pyeff && rm -f $(SAN_DIR)/site/pyeff/_C*.so
	cp -r kernels $(SAN_DIR)/site/pyeff/kernels && cp -r bench $(SAN_DIR)/site/pyeff/bench && cp -r hw $(SAN_DIR)/site/pyeff/hw
	cp $(SAN_DIR)/lib/pyeff/_C*.so $(SAN_DIR)/site/pyeff/
	$(SAN_ENV) $(PY) -P -c "import pyeff._C as c, sys; f = c.__file__; print('sanitized pyeff._C:', f); \
	  sys.exit(0 if '$(SAN_DIR)/site' in f else 'pyeff._C is not the sanitized build')"
	$(SAN_ENV) $(PY) -P -m pytest -q -p no:cacheprovider $(SAN_TESTS)

clean:
	rm -rf build *.egg-info pyeff/_C*.so
