"""Robustness evaluation: clean accuracy, accuracy under embedding-space attacks, the minimal adversarial
perturbation, and a word-substitution attack, for single-label and multi-label classifiers.

Function API::

    from hf_adv.robustness import evaluate_robustness, write_report

    metrics = evaluate_robustness(model, eval_dataset, tokenizer, epsilons=[0.1, 0.25, 0.5])
    write_report({"fgm": metrics}, "robustness/")  # robustness.json, robustness.md, robustness.png

`adversarial_accuracy(model, dataloader, epsilons)` is the cheap part (PGD only) that
`AdversarialTrainer.evaluate()` reports as `eval_adv_accuracy@{eps}`.

CLI (in `__main__.py`; one line per model in the plot; `--results` adds the JSON of earlier runs to the same table
and figure)::

    python -m hf_adv.robustness --model_paths out/none out/fgm --model_names none fgm \\
        --dataset ../shared/data/imdb/test.csv.gz --num_examples 1000 --output_dir docs/robustness

What is attacked, and how:

- Embedding attacks perturb the output of the input word embedding (`model.get_input_embeddings()`), as adversarial
  training does (Miyato et al., "Adversarial Training Methods for Semi-Supervised Text Classification", ICLR 2017;
  Zhu et al., "FreeLB", ICLR 2020). The perturbation of one example is bounded in L2 norm over all its (non-padding)
  positions, and maximizes the model's own loss on the true labels: cross-entropy, or BCE for multi-label models.
- FGM: one step eps * g / ||g||. PGD-K (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018): the FGM point, then K - 1 steps of `step_size * eps` along the normalized gradient, each
  projected back onto the eps-ball. An example counts as fooled when any point the attack visited fools the model
  (the clean input, the FGM point, every iterate), and when it was fooled at a smaller epsilon of the grid, since
  that adversarial input lies in the larger ball too. So PGD is never weaker than FGM, never better than clean,
  and accuracy under PGD never rises with epsilon.
- Minimal perturbation (the robustness measure of Papernot et al., "Distillation as a Defense to Adversarial
  Perturbations against Deep Neural Networks", IEEE S&P 2016): per example, the smallest eps at which PGD changes
  the model's prediction (any label for multi-label models), found by bisection on [0, max_epsilon].
- Word substitution (Papernot et al., "Crafting Adversarial Input Sequences for Recurrent Neural Networks", MILCOM
  2016; Ebrahimi et al., "HotFlip", ACL 2018): greedily, one token per step, the substitution w -> w' with the
  largest first-order loss increase (e_w' - e_w) . g, w' among the `word_neighbours` nearest tokens to w by cosine
  similarity in the model's own input embedding, until the prediction gets worse or the budget is spent.

Evaluation computes no parameter gradient, never writes a weight, and leaves every module in the train/eval mode
it found it in.

The package, one file per job: `core` (the model on a batch), `embedding_attacks` (FGM/PGD grid, minimal
perturbation), `word` (the word-substitution attack), `evaluator` (`RobustnessEvaluator`: all of them over a data
set), `api` (the function API), `data` (batches in), `report` (table, plot, JSON out), `__main__` (the CLI).
"""

from __future__ import annotations

from .api import adversarial_accuracy, evaluate_robustness, load_model
from .core import ATTACK_LOSSES, LABEL_KEYS, epsilon_key, margin_loss
from .data import LABEL_COLUMNS, TEXT_COLUMNS, build_dataloader, find_column, load_rows, read_table
from .evaluator import ATTACKS, RobustnessEvaluator
from .report import markdown_table, plot_accuracy, read_results, write_report
from .word import WordAttackResult

__all__ = [
    "ATTACKS",
    "ATTACK_LOSSES",
    "LABEL_COLUMNS",
    "LABEL_KEYS",
    "RobustnessArguments",
    "RobustnessEvaluator",
    "TEXT_COLUMNS",
    "WordAttackResult",
    "adversarial_accuracy",
    "build_dataloader",
    "cli",
    "epsilon_key",
    "evaluate_robustness",
    "find_column",
    "load_model",
    "load_rows",
    "main",
    "margin_loss",
    "markdown_table",
    "plot_accuracy",
    "read_results",
    "read_table",
    "write_report",
]

_CLI_NAMES = ("RobustnessArguments", "main", "cli")


def __getattr__(name: str):
    # The CLI lives in `__main__.py`; importing it here eagerly would make `python -m hf_adv.robustness` find it
    # imported already (a RuntimeWarning from runpy), so its names are loaded on first use.
    if name in _CLI_NAMES:
        from . import __main__ as cli_module

        return getattr(cli_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
