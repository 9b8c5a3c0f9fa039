"""FGM: the fast gradient method on word embeddings (Miyato et al., "Adversarial Training Methods for
Semi-Supervised Text Classification", ICLR 2017)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method


@register_method
class FGM(AdversarialMethod):
    """Fast gradient method: one step r = epsilon * g / ||g||_2 on the embedding rows the batch looks up.

    g is the gradient of this micro-batch's loss with respect to those rows. Only the touched rows are backed up
    and perturbed (the classic snippet clones the whole vocab x hidden matrix), and they are copied back bit for bit
    when `perturbed()` exits.

    fp16: under a GradScaler g arrives multiplied by the loss scale; g / ||g|| does not depend on that scale, and a
    step whose gradient overflowed (norm Inf or NaN) is skipped, as the scaler skips its optimizer step.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of the perturbation over all touched rows.
        embedding_name (`str`, *optional*): see `AdversarialMethod`.
        attach (`bool`, *optional*, defaults to `True`): see `AdversarialMethod`.
    """

    name = "fgm"

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, *, embedding_name: str | None = None, attach: bool = True
    ):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        super().__init__(model, embedding_name=embedding_name, attach=attach)
        self.epsilon = epsilon

    def step(self, grad: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The perturbation of the touched rows for their gradient `grad` of L2 norm `norm`."""
        return self.epsilon * grad / norm

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None) -> Iterator[AttackResult]:
        rows, grad = self.tap.captured_gradient()
        self.tap.reset()
        norm = grad.norm()
        if not is_usable_norm(norm):
            yield AttackResult(skipped=True)
            return
        r = self.step(grad, norm).to(self.tap.weight.dtype)
        weight = self.tap.weight
        with torch.no_grad():
            backup = weight.index_select(0, rows)
            weight.index_add_(0, rows, r)
        try:
            yield AttackResult(norm=r.norm())
        finally:
            with torch.no_grad():
                weight.index_copy_(0, rows, backup)
            self.tap.reset()
