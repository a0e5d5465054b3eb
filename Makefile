# Set-up commands of the README. Each creates its own environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds that install from local files on the project machines;
# on a GPU machine install your CUDA build of torch first, then `pip install -e .`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test lint venv demo bench clean

$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests

# ruff (lint + import order) and the import contracts of pyproject.toml ([tool.importlinter]).
lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

# The whole method on the built-in synthetic world (offline, CPU: about 7 minutes plus creating .venv); prints the report path.
DEMO_OUT ?= demo-output
demo: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/recare demo --out $(DEMO_OUT)

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_careset.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache $(DEMO_OUT)
