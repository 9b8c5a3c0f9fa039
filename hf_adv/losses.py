"""Losses shared by the trainer and VAT: divergences between predictions, and supervised losses that let examples
without a label through (semi-supervised VAT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"


def infer_problem_type(config, labels: torch.Tensor | None) -> str:
    """The model's `problem_type`, or what transformers would infer from the labels on the first forward."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type:
        return problem_type
    if getattr(config, "num_labels", 2) == 1:
        return "regression"
    if labels is None or labels.dtype in (torch.long, torch.int):
        return SINGLE_LABEL
    return MULTI_LABEL


def softmax_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) || softmax(logits)), summed over classes, mean over examples; clean is not differentiated."""
    clean_log_p = F.log_softmax(clean_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (clean_log_p.exp() * (clean_log_p - log_q)).sum(-1).mean()


def bernoulli_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-label Bernoulli KL(sigmoid(clean) || sigmoid(logits)), summed over labels, mean over examples."""
    clean = clean_logits.detach().float()
    logits = logits.float()
    p = torch.sigmoid(clean)
    kl = p * (F.logsigmoid(clean) - F.logsigmoid(logits)) + (1 - p) * (F.logsigmoid(-clean) - F.logsigmoid(-logits))
    return kl.sum(-1).mean()


def divergence(problem_type: str):
    if problem_type == SINGLE_LABEL:
        return softmax_kl
    if problem_type == MULTI_LABEL:
        return bernoulli_kl
    raise ValueError(
        f"VAT needs a classification model; problem_type={problem_type!r} is not one of {[SINGLE_LABEL, MULTI_LABEL]}."
    )


def has_missing_labels(labels: torch.Tensor) -> bool:
    return bool((labels == IGNORE_INDEX).any())


def masked_classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Supervised loss over the labelled part of a batch, 0 (with a graph) when nothing is labelled.

    Single-label: cross-entropy over examples whose label is not -100. Multi-label: BCE with logits over the
    (example, label) entries that are not -100, so a row of all -100 is an unlabelled example.
    """
    if problem_type == SINGLE_LABEL:
        labels = labels.reshape(-1)
        labelled = labels != IGNORE_INDEX
        if not labelled.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(labels.numel(), -1)[labelled], labels[labelled])
    if problem_type == MULTI_LABEL:
        labelled = labels != IGNORE_INDEX
        if not labelled.any():
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[labelled], labels[labelled].to(logits.dtype))
    raise ValueError(f"Labels of -100 (unlabelled examples) need a classification model, not {problem_type!r}.")
