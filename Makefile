# Every target creates or refreshes .venv on its own, so a fresh clone needs nothing else.
PY      := .venv/bin/python
STAMP   := .venv/.installed
OUT     ?= runs/demo

.PHONY: demo test test-fast test-min test-slow lint bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# .venv-min: every dependency at the floor pyproject.toml declares (scripts/min_constraints.py turns each
# `>=X` into `==X`; the transitive ones resolve freely), binary wheels only. torch is the exception: it stays
# at its requirements-dev.txt pin, the CPU wheel these machines serve locally. PyPI's Linux x86_64 torch
# wheels are CUDA builds (torch 2.6: a 767 MB wheel plus 2.3 GB of nvidia-* and triton wheels) and no CPU
# index is reachable, so the torch floor (2.6: transformers 5.23 disables torch below 2.6) is declared but
# not tested here.
MIN_PY    := .venv-min/bin/python
MIN_STAMP := .venv-min/.installed

$(MIN_STAMP): pyproject.toml requirements-dev.txt scripts/min_constraints.py
	test -x $(MIN_PY) || python3 -m venv .venv-min
	$(MIN_PY) -m pip install --quiet --upgrade pip
	$(MIN_PY) scripts/min_constraints.py --dev-pin torch --out .venv-min/constraints.txt
	$(MIN_PY) -m pip install --quiet --only-binary :all: -c .venv-min/constraints.txt -e '.[peft,world,tensorboard,dev]'
	touch $(MIN_STAMP)

demo: $(STAMP)
	.venv/bin/mallowspo demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

# The math and training unit tests: about 3-4 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q tests/math tests/training

# The declared floors work: test-fast, plus the experiment tests that draw matplotlib figures and score
# with vaderSentiment, and lint, on the minimum versions (.venv-min, above). About 6 min on 2 cores from a
# fresh clone: 2.5 to install, 3.5 to test.
test-min: $(MIN_STAMP)
	$(MIN_PY) -m pytest -n 2 -q tests/math tests/training \
		tests/experiments/test_bandit.py tests/experiments/test_estimator_check.py tests/experiments/test_world.py
	.venv-min/bin/ruff check src tests benchmarks scripts
	.venv-min/bin/ruff format --check src tests benchmarks scripts

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/run.py --profile mpo_phi_pre,mpo_phi_pre@bf16 --out benchmarks/RESULTS.md

clean:
	rm -rf .venv .venv-min runs .pytest_cache
