PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch and torchvision are pinned to the builds this machine serves locally.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/kavg sweep run sweeps/quickstart.yaml --resume

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check kavg_ray tests benchmarks
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

# Every test that starts no Ray (the inner loop; `make test` is the whole suite).
test-fast: $(TEST_STAMP)
	$(VENV)/bin/ruff check kavg_ray tests benchmarks
	$(PY) -m pytest -q -m "not ray" --durations=10 $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check kavg_ray tests benchmarks

clean:
	rm -rf $(VENV) kavg_results
