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

# K_opt by accuracy for P = 16 (sweeps/quickstart.yaml; --resume: a rerun finishes or
# reprints it), then each K's time to 58% test accuracy priced by the cost model on two
# networks of equal bandwidth, 5 us and 100 us latency, at 0.5 ms a local step.
DEMO_PRICE := $(VENV)/bin/kavg results kopt quickstart --by time --target 0.58 --step-time 0.0005

demo: $(STAMP)
	@$(VENV)/bin/kavg sweep run sweeps/quickstart.yaml --resume
	@$(DEMO_PRICE) --network ib400
	@$(DEMO_PRICE) --network wan400g

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
