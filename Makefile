# Two entry points for a fresh machine (Python 3.11, no GPU, PyPI): `make demo` and `make test`.
# The virtualenv is rebuilt only when requirements.txt or this file change.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OMP_NUM_THREADS ?= 2

$(VENV)/.installed: requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned everywhere: anything unpinned would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt torch==2.13.0
	# colossalai's metadata pins torch<=2.5.1 and transformers==4.51.3; it runs with ours, so skip its deps.
	$(PY) -m pip install -q --no-deps colossalai==0.5.0
	touch $@

.PHONY: venv demo test test-fast gpu-check
venv: $(VENV)/.installed

demo: venv
	$(PY) train.py $(TRAIN_ARGS)
	$(PY) infer.py --greedy --prompt "3 4 + 2 5 =" --prompt "reverse: a b c d ->" --prompt "capital: France ->"

# Two workers, whole files each (module fixtures run once): the suite waits on process starts and launches of
# several ranks about as much as it computes, so two run in about three quarters of the time of one.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

# The in-process tests only (no multi-process launches, nothing over ~20 s): a few minutes.
test-fast: venv
	$(PY) -m pytest -q tests -m "not slow and not distributed"

# The GPU check (benchmarks/README.md): every measurement on one CUDA device in <= 8 minutes, one file per part
# under benchmarks/results/<date>-<device>/; SUITE_ARGS="--smoke" runs it on CPU. On a GPU machine without registry
# access the command is `python3 -m benchmarks.suite --out $OUT`, after the wheel install line in that README.
gpu-check: venv
	$(PY) -m benchmarks.suite $(SUITE_ARGS)
