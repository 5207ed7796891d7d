# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing or older than
# pyproject.toml (the stamp below), install the pinned stack with pip, then do their job.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
XTCOCOTOOLS := xtcocotools==1.14.3
MLFLOW_PORT ?= 5000

.PHONY: demo test lint format gpu-check mlflow-ui clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# xtcocotools' wheel is built against numpy 1 and breaks under numpy 2: build it from source.
	$(BIN)/python -m pip install --quiet --no-binary xtcocotools --no-build-isolation $(XTCOCOTOOLS)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/ablation_grid.py --config experiments/configs/ablation_synthetic.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

# GPU acceptance: environment, latency, memory, training, kill-and-resume and scaling at the paper's sizes, in
# under 10 minutes on one H100. Without a CUDA device it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf data/synthetic ray_results mlartifacts mlruns.db .pytest_cache .ruff_cache
