# One command sets everything up (`make install`), one runs the tests (`make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch/torchvision pinned to the versions this project is tested with; pyproject allows a range.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast lint typecheck run bench docs clean

install: $(BIN)/metarun

$(BIN)/metarun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[dev,bench,sweep,cluster,plot,docs,rl]'
	@touch $@

test: install
	$(BIN)/ruff check metarun tests scripts
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

run: install
	$(BIN)/metarun

bench: install
	$(BIN)/python scripts/bench_unroll.py

# The documentation site into site/ (open site/index.html); strict, as tests/test_docs.py builds it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .mypy_cache .ruff_cache
