# Every target builds .venv first; torch stays pinned to the CPU wheel via constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
PYTEST_ARGS ?=

.PHONY: venv demo gpt lint test docs bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

demo: venv
	rm -rf runs/demo
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/digits/train.py --max-epochs 10 --checkpoint-dir runs/demo/checkpoints --output-dir runs/demo/output --model-dir runs/demo/model

# ruff (lint, import order) and mypy over the whole tree; benchmarks/ holds several bench.py
# scripts that import their siblings by path, so mypy checks each of its folders on its own.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	for d in "examples/gpt/model.py examples/gpt/train.py" benchmarks/checkpoint benchmarks/metrics benchmarks/sharding benchmarks/streams "benchmarks/overhead benchmarks/harness.py benchmarks/run_all.py"; do \
		MYPYPATH=benchmarks:benchmarks/overhead:examples/gpt $(VENV)/bin/mypy $$d || exit 1; done

# A small GPT on the repository's docs, sharded over 2 processes (see docs/howto/sharded.md).
gpt: venv
	rm -rf runs/gpt
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/gpt/train.py --strategy fsdp --output-dir runs/gpt

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

docs: venv
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs docs/_build
