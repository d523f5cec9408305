# Two commands a new user needs (see README):
#   make demo   install, make demo studies + a quick model, serve on 127.0.0.1:8000
#   make test   install, run the test suite (fast tests + the slow end-to-end ones that fit CI)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast demo bench
install:
	@bash scripts/install.sh $(VENV)

test: install
	$(PY) -m pytest -q --runslow tests

test-fast: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/spmamba demo

# quick core benchmarks (selective scan, prototypes, model forward; docs/BENCHMARKS.md has the full commands)
bench: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_core.py --quick
