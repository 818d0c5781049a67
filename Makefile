# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The ahead-of-time compilers (libtpu, the CUDA PJRT plugin), installed apart so that only the
# AOT tests (tests/test_aot.py puts this folder on their subprocesses' path) load them.
AOT_COMPILERS := $(VENV)/aot-compilers
AOT_STAMP := $(AOT_COMPILERS)/.installed

.PHONY: demo ablation test format install clean

$(STAMP): requirements.txt requirements-test.txt requirements-beam.txt pyproject.toml
	@echo ">> creating $(VENV) and installing the pinned requirements"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

$(AOT_STAMP): requirements-aot.txt | $(STAMP)
	@echo ">> installing the ahead-of-time compilers into $(AOT_COMPILERS)"
	rm -rf $(AOT_COMPILERS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(AOT_COMPILERS) -r requirements-aot.txt
	touch $(AOT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m capture_jax.demo

ablation: $(STAMP)
	$(PY) -m capture_jax.ablation

# Two pytest workers (pytest-xdist), a test module to a worker: the module-scoped fixtures (the
# compiled steps, the SLURM cluster, the GCS emulator) are made once. Most tests compile and run
# in one thread, so two workers use both cores of a 2-core machine. More workers: TEST_WORKERS=N.
TEST_WORKERS ?= 2

test: $(STAMP) $(AOT_STAMP)
	@echo ">> checking the formatting (pyink, configured in pyproject.toml; 'make format' fixes it)"
	$(PY) -m pyink --check --quiet .
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

format: $(STAMP)
	$(PY) -m pyink .

clean:
	rm -rf $(VENV) runs
