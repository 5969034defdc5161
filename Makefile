# Two commands do everything on a fresh machine:
#   make lab    set up .venv and open JupyterLab on notebooks/
#   make test   set up .venv and run every test (pytest + nbval over the notebooks)
#   make test-fast   the edit-test loop: pytest without real processes, slow tests or notebooks
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Jupyter's "python3" kernel runs the first `python` on PATH: make it this environment's.
RUN := PATH="$(abspath $(BIN)):$$PATH"
PYTEST_ARGS ?=
# `make test` runs on this many pytest-xdist workers (0: in this one process). --dist loadfile keeps each
# file, so each notebook's cells, in one worker and in order (tests/conftest.py hands out the longest files
# first); 2 fits the 2-core machines it targets (3 measured the same).
TEST_WORKERS ?= 2

.PHONY: setup lab test test-fast notebooks bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[notebooks,dev]"
	touch $@

# One OpenMP thread per kernel, as tools/run_notebooks.py and make test compute the stored outputs (a float64
# sum's last bit depends on the thread count; the simulator computes each rank on one thread anyway).
lab: setup
	$(RUN) OMP_NUM_THREADS=1 $(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)  # root (containers) needs it

test: setup
	$(RUN) $(BIN)/python -m pytest -rs tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	@test -x /usr/bin/chromium || echo "NOTE: the browser test (tests/test_browser.py) was SKIPPED: /usr/bin/chromium is missing (apt-get install chromium)"

test-fast: setup
	$(RUN) $(BIN)/python -m pytest tests -m "not real and not slow and not browser" $(PYTEST_ARGS)

# Re-execute every notebook in place so its stored outputs are current (after changing the package).
notebooks: setup
	$(RUN) $(BIN)/python tools/run_notebooks.py notebooks/*.ipynb

bench: setup
	$(RUN) $(BIN)/python benchmarks/collectives.py
	$(RUN) $(BIN)/python benchmarks/block.py
	$(RUN) $(BIN)/python benchmarks/attention.py
	$(RUN) $(BIN)/python benchmarks/scaling.py
	$(RUN) OMP_NUM_THREADS=1 $(BIN)/python benchmarks/hybrid_mesh.py
	$(RUN) $(BIN)/python benchmarks/torch_api.py

clean:
	rm -rf $(VENV) build *.egg-info report
