# Every target creates or refreshes .venv on its own, so a fresh clone needs nothing else.
PY      := .venv/bin/python
STAMP   := .venv/.installed
OUT     ?= runs/demo

.PHONY: demo test test-fast test-slow lint bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/mallowspo demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

# The math and training unit tests: under a minute on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q tests/math tests/training

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks/RESULTS.md

clean:
	rm -rf .venv runs .pytest_cache
