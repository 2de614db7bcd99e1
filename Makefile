# Two commands from a fresh clone (Python 3.11, nothing installed):
#   make demo   -> creates .venv, installs bodyage, runs the whole pipeline on the synthetic cohort
#   make test   -> installs the test and docs tools too, runs lint, types, the layer contract, the strict
#                  docs build (make docs) and the test suite
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# Torch is pinned here (not in pyproject) so users on a cluster can pick their own CUDA build:
#   make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121"
# The demo needs torch alone (a CPU build is enough); an existing torch is kept.
TORCH_SPEC ?= torch==2.13.0
# The tests and `bodyage segment` also need torchvision (TotalSegmentator through timm, grad-cam), which
# comes as a pair with its torch; this pair is torch's default (CUDA) build, CPU-only machines included.
TORCHVISION_SPEC ?= torch==2.14.1 torchvision==0.29.1
# extras the tests install: `segment` runs the TotalSegmentator tests (skipped, with the reason, without it)
TEST_EXTRAS ?= test,segment
DEMO_DIR   ?= demo
PYTEST_ARGS ?=

.PHONY: demo test lint install install-segment clean docs docs-serve

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCHVISION_SPEC) -e '.[$(TEST_EXTRAS)]'
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -e '.[docs]'
	touch $@

install: $(VENV)/.installed

# bodyage with TotalSegmentator, for `bodyage segment` on real scans
install-segment: $(VENV)/.installed
	$(BIN)/pip install $(TORCHVISION_SPEC) -e '.[segment]'

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
