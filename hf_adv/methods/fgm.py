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
    """Fast gradient method: one step r = epsilon * g / ||g||_2 over the embedding rows the batch looks up.

    g (rows x hidden) is the gradient of this micro-batch's loss with respect to those rows, as `nn.Embedding`
    computes it (the classic snippet reads it from `weight.grad`). The perturbation is added to the embedding OUTPUT:
    every position that looks up row i gets r[i], which is what adding r to the weight rows would do, without
    writing the weight (a tied LM head and other users of the weight see it unchanged) and without a backup.

    fp16: under a GradScaler g arrives multiplied by the loss scale; g / ||g|| does not depend on that scale, and a
    step whose gradient overflowed (norm Inf or NaN) is skipped, as the scaler skips its optimizer step.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of r over all touched rows, in units of the
            embedding output.
        embedding_name (`str`, *optional*): see `AdversarialMethod`.
        attach (`bool`, *optional*, defaults to `True`): see `AdversarialMethod`.

    Raises:
        `ValueError`: when `epsilon <= 0` or the model has no input embedding.
    """

    name = "fgm"

    def __init__(self, model: nn.Module, epsilon: float = 1.0, **kwargs):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        super().__init__(model, **kwargs)
        self.epsilon = epsilon

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {"epsilon": args.adv_epsilon}

    @classmethod
    def describe(cls, args) -> str:
        return f"{cls.name} (epsilon {args.adv_epsilon})"

    def step(self, grad: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The perturbation of the touched rows for their gradient `grad` of L2 norm `norm`."""
        return self.epsilon * grad / norm

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None) -> Iterator[AttackResult]:
        tap = self.tap
        _, grad = tap.captured_gradient()
        norm = grad.norm()
        if not is_usable_norm(norm):
            tap.reset()
            yield AttackResult(skipped=True)
            return
        r = self.step(grad, norm)
        deltas = tap.row_deltas(r)
        tap.reset()
        try:
            with tap.shifted(deltas):
                yield AttackResult(norm=r.norm())
        finally:
            tap.reset()
