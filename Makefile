# The CPU wheel of torch 2.13.0 is installed first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo trend-demo test lint samples bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deadrelu scan sample_models/mlp/model.pt --arch sample_models/mlp/arch.py:build --data sample_models/mlp/calib.npz

# a small training run (5 checkpoints of the sample MLP, build/trend-run), then `deadrelu trend` on it
trend-demo: $(STAMP)
	$(PY) scripts/make_trend_run.py build/trend-run
	$(VENV)/bin/deadrelu trend build/trend-run --data build/trend-run/calib.npz --arch sample_models/mlp/arch.py:build

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check deadrelu_cli tests scripts
	$(VENV)/bin/ruff format --check deadrelu_cli tests scripts

samples: $(STAMP)
	$(PY) scripts/make_sample_models.py

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
