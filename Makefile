# Two commands do all set-up on a fresh machine: `make train` (ACKTR on CartPole-v1, TensorBoard
# logs in runs/) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv train test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(BIN)/python scripts/train.py --config configs/acktr/cartpole.yaml
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs   (then open http://localhost:6006)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python scripts/bench_optimizer.py

clean:
	rm -rf $(VENV) build *.egg-info
