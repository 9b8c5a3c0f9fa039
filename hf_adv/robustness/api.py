"""The function API: `evaluate_robustness` (every attack, one model) and `adversarial_accuracy` (PGD or FGM only,
what `AdversarialTrainer.evaluate()` reports)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .core import epsilon_key
from .data import build_dataloader
from .evaluator import RobustnessEvaluator


def load_model(path: str, device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """A sequence classifier from a folder or Hub name (`AutoModelForSequenceClassification.from_pretrained`, given
    `kwargs`, e.g. `local_files_only=True`), on `device`."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return model.to(device) if device is not None else model


def evaluate_robustness(
    model: nn.Module | str,
    data,
    tokenizer=None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    **evaluator_kwargs,
) -> dict[str, float]:
    """Clean accuracy and accuracy under attack of one model; see `RobustnessEvaluator` for the attack settings.

    Args:
        model (`nn.Module` or `str`): the model, or a folder to load it from with
            `AutoModelForSequenceClassification.from_pretrained`.
        data: a `DataLoader` of batches with labels, a tokenized data set, or a data set (or list of dicts) of raw
            text in `text_column` with labels in `label_column` (by default the first of `TEXT_COLUMNS` /
            `LABEL_COLUMNS` present, as the recipes read a table): class ids or the class names of the model's
            `config.id2label`; for multi-label models lists of label ids or names, comma-separated, or multi-hot
            vectors.
        tokenizer (*optional*): the tokenizer or its folder; by default loaded from `model` when it is a folder.

    Returns:
        `dict[str, float]`: `num_examples`; `embedding_norm_mean` (the L2 norm of a clean example's embedding output,
        the scale of epsilon); `clean_accuracy`, `fgm_accuracy@{eps}`, `pgd_accuracy@{eps}`;
        `min_perturbation_mean`, `min_perturbation_median`, `min_perturbation_unflipped` (the fraction of examples
        PGD could not flip at `max_epsilon`, counted as `max_epsilon` in the mean and median);
        `word_attack_success_rate` (among the examples attacked: single-label, those predicted correctly; multi-label,
        those with a label left to get wrong), `word_attack_accuracy`, `word_attack_fraction_changed` (mean over the
        successful attacks of changed tokens / tokens); `seconds` and its parts `seconds_clean`, `seconds_fgm_pgd`,
        `seconds_min_perturbation`, `seconds_word` (wall time of each attack that ran), and
        `forward_passes_per_example` / `backward_passes_per_example` (the cost: examples through the model per
        evaluated example). For multi-label
        models every "accuracy" is micro-F1 with logits thresholded at 0.
    """
    if isinstance(tokenizer, str) or (tokenizer is None and isinstance(model, str)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer if isinstance(tokenizer, str) else model)
    if isinstance(model, str):
        model = load_model(model, device)
    elif device is not None:
        model = model.to(device)
    description = evaluator_kwargs.pop("description", "robustness")
    evaluator = RobustnessEvaluator(model, tokenizer, **evaluator_kwargs)
    batches = build_dataloader(
        data,
        tokenizer,
        problem_type=evaluator.problem_type,
        num_labels=evaluator.num_labels,
        text_column=text_column,
        label_column=label_column,
        max_length=max_length,
        batch_size=batch_size,
        id2label=getattr(getattr(model, "config", None), "id2label", None),
    )
    return evaluator.evaluate(batches, description=description)


def adversarial_accuracy(
    model: nn.Module,
    dataloader: Iterable[dict[str, Any]],
    epsilons: Sequence[float],
    steps: int = 5,
    step_size: float | None = None,
    *,
    method: str = "pgd",
    attack_loss: str = "ce",
    embedding_name: str | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    disable_tqdm: bool = False,
) -> dict[str, float]:
    """Accuracy (micro-F1 for multi-label models) under PGD-`steps` (or FGM) at each epsilon, as
    `{"adv_accuracy@{eps}": value}`: what `AdversarialTrainer.evaluate()` adds as `eval_adv_accuracy@{eps}`.

    Args:
        model (`nn.Module`): the model; its weights, gradients and train/eval mode are left as found.
        dataloader: batches as the model takes them, with `labels`.
        epsilons (`Sequence[float]`): L2 radii per example on the embedding output.
        steps (`int`, *optional*, defaults to `5`): PGD iterates.
        step_size (`float`, *optional*): see `RobustnessEvaluator.pgd_step_size`.
        method (`str`, *optional*, defaults to `"pgd"`): `"pgd"` or `"fgm"`.
        attack_loss (`str`, *optional*, defaults to `"ce"`): `"ce"` or `"margin"` (see `RobustnessEvaluator`).
        gather (*optional*): `accelerator.gather_for_metrics` when each process sees a shard of the data.
    """
    if method not in ("pgd", "fgm"):
        raise ValueError(f"method must be 'pgd' or 'fgm', got {method!r}.")
    evaluator = RobustnessEvaluator(
        model,
        epsilons=epsilons,
        attacks=(method,),
        pgd_steps=steps,
        pgd_step_size=step_size,
        attack_loss=attack_loss,
        embedding_name=embedding_name,
        disable_tqdm=disable_tqdm,
    )
    metrics = evaluator.evaluate(dataloader, gather=gather, description=f"{method} accuracy")
    return {f"adv_accuracy@{epsilon_key(e)}": metrics[f"{method}_accuracy@{epsilon_key(e)}"] for e in epsilons}
