"""R-Drop: regularized dropout (Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import find_logits
from .base import Regularizer, register_method


@register_method
class RDrop(Regularizer):
    """A second forward of the labelled rows with its own dropout mask, and the symmetric divergence between the
    predictions of the two passes: weight * (D(p1 || p2) + D(p2 || p1)) / 2, differentiated through both passes.

    D is the softmax KL for single-label classification (and per-token predictions, averaged over real tokens), the
    per-label Bernoulli KL averaged over the labels for multi-label (as the BCE averages), the squared error for
    regression (as VAT chooses it). As in the paper (eq. 3: L = NLL(p1) + NLL(p2) + alpha * KL_sym), the second
    pass's supervised loss (the user's loss code, on the micro-batch-mean scale) is added too, so a step trains on
    both passes' losses. The first pass is the trainer's clean pass, so R-Drop costs one more forward+backward; its
    graph is kept until R-Drop's backward (one backward for both when no perturbation needs the clean gradient
    first). With AWP, which moves the weights in between, the kept graph holds a copy of the weights it saved.

    Without dropout in the model (`model.eval()`-like configs, dropout 0) both passes agree and only the second
    supervised loss remains.

    Args:
        model (`nn.Module`): the model.
        weight (`float`, *optional*, defaults to `1.0`): alpha, the weight of the symmetric divergence
            (`rdrop_weight`; the paper tunes it per task).

    Raises:
        `ValueError`: for a non-positive `weight`.
    """

    name = "rdrop"
    weight_field = "rdrop_weight"
    uses_embedding = False
    needs_clean_graph = True
    metrics = ("rdrop_loss",)

    def __init__(self, model: nn.Module, *, weight: float = 1.0, **kwargs):
        super().__init__(model, weight=weight, **kwargs)
        self.resolved_divergence: str | None = None  # kl, bernoulli or mse, resolved at the first step

    @classmethod
    def describe(cls, args) -> str:
        return f"rdrop (weight {args.rdrop_weight})"

    def term(self, step) -> torch.Tensor | None:
        """NLL(p2) + weight * KL_sym(p1, p2) for the labelled rows, or None when the step ran no clean pass on them."""
        if step.labelled is None or step.clean_outputs is None:
            return None
        loss, outputs = step.loss_and_outputs(step.labelled)
        first, second = find_logits(step.clean_outputs), find_logits(outputs)
        if self.resolved_divergence is None:
            self.resolved_divergence = step.resolve_divergence("auto", first, step.labelled)
        divergence = step.divergence(self.resolved_divergence, first, step.labelled, symmetric=True)(first, second)
        step.record("rdrop_loss", divergence)
        return loss + self.weight * divergence
