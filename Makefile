# Two commands from a fresh clone (Python 3.11, nothing installed):
#   make demo   -> creates .venv, installs bodyage, runs the whole pipeline on the synthetic cohort
#   make test   -> installs the test and docs tools too, runs lint, types, the layer contract, the strict
#                  docs build (make docs) and the test suite
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# Torch is pinned here (not in pyproject) so users on a cluster can pick their own CUDA build:
#   make demo TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu121"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR   ?= demo
PYTEST_ARGS ?=

.PHONY: demo test lint install clean docs docs-serve

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -e '.[docs]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/bodyage demo $(DEMO_DIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check bodyage analysis cli tests reports
	$(BIN)/ruff format --check bodyage analysis cli tests reports
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint docs
	$(BIN)/pytest $(PYTEST_ARGS)

# the documentation site (docs/, mkdocs.yml): warnings are errors, so a broken link fails
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
