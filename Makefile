# Set-up from nothing: `make demo` and `make test` each create .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run Triton kernels through its CPU interpreter where there is no GPU.
TEST_ENV := TRITON_INTERPRET=1 PYTHONUNBUFFERED=1

.PHONY: demo test test-slow lint bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pcr_compile.demo

# pytest exits 5 when it collected nothing: that is a failure here, never a silent success.
test: $(STAMP)
	@$(TEST_ENV) $(PY) -m pytest -m "not slow" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	@$(TEST_ENV) $(PY) -m pytest -m slow -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check pcr_compile passes kernels tests benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks run --suite all --quick --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info bench_out
