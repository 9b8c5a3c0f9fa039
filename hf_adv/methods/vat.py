"""VAT: virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A Regularization Method for
Supervised and Semi-Supervised Learning", TPAMI 2018; for text, "Adversarial Training Methods for Semi-Supervised
Text Classification", ICLR 2017)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..embedding import EmbeddingTap, find_input_embedding
from ..losses import divergence


def normalize_per_example(d: torch.Tensor) -> torch.Tensor:
    """Scale each example (first dimension) of `d` to unit L2 norm over all its other dimensions."""
    norms = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return d / norms.view(-1, *([1] * (d.dim() - 1)))


class VAT:
    """Local distributional smoothness, LDS = D(p(x) || p(x + r_adv)), on the output of the input embedding.

    r_adv comes from power iteration: a random direction d, scaled to `xi` per example; the gradient of
    D(p(x) || p(x + d)) with respect to d (and only d: `torch.autograd.grad`, no parameter gradient) becomes the
    next d; after `iterations` rounds r_adv = epsilon * d / ||d|| per example. D is the softmax KL for single-label
    models and the sum of per-label Bernoulli KLs for multi-label ones. LDS needs no labels, so unlabelled examples
    contribute to it.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of r_adv per example.
        xi (`float`, *optional*, defaults to `10.0`): size of d during power iteration.
        iterations (`int`, *optional*, defaults to `1`): power iterations.
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        xi: float = 10.0,
        iterations: int = 1,
        *,
        embedding_name: str | None = None,
        attach: bool = True,
        tap: EmbeddingTap | None = None,
    ):
        if not epsilon > 0:
            raise ValueError(f"vat epsilon must be > 0, got {epsilon}.")
        if not xi > 0:
            raise ValueError(f"vat xi must be > 0, got {xi}.")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"vat iterations must be an integer >= 1, got {iterations!r}.")
        self.epsilon, self.xi, self.iterations = epsilon, xi, iterations
        if tap is None:
            tap = EmbeddingTap(*find_input_embedding(model, embedding_name))
            if attach:
                tap.attach()
        self.tap = tap

    def remove(self) -> None:
        self.tap.detach()

    def sample_noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The random start of power iteration (seeded by the global torch RNG)."""
        return torch.randn(shape, device=like.device, dtype=torch.float32)

    def adversarial_direction(
        self,
        forward: Callable[[], torch.Tensor],
        clean_logits: torch.Tensor,
        input_shape: tuple[int, int],
        problem_type: str,
        scale: float = 1.0,
    ) -> torch.Tensor | None:
        """r_adv for the batch, or None when power iteration produced a non-finite or zero direction.

        Args:
            forward: runs the model on the batch (without labels) and returns its logits.
            clean_logits: logits of the clean forward on the same batch.
            input_shape: (batch, sequence) of the input ids.
            scale: multiplies the divergence before `autograd.grad` (the fp16 loss scale keeps the small
                gradients from underflowing; the direction does not depend on it).
        """
        distance = divergence(problem_type)
        weight = self.tap.weight
        d = self.sample_noise((*input_shape, weight.shape[-1]), clean_logits)
        for _ in range(self.iterations):
            d = (self.xi * normalize_per_example(d)).requires_grad_(True)
            with torch.enable_grad(), self.tap.shifted(d):
                logits = forward()
            (d,) = torch.autograd.grad(distance(clean_logits, logits) * scale, d)
        self.tap.reset()
        norms = d.flatten(1).norm(dim=1)
        if not torch.isfinite(norms).all() or not (norms > 0).any():
            return None
        return self.epsilon * normalize_per_example(d)

    def loss(
        self, forward: Callable[[], torch.Tensor], clean_logits: torch.Tensor, r_adv: torch.Tensor, problem_type: str
    ) -> torch.Tensor:
        """LDS at the perturbation `r_adv`; differentiable with respect to the parameters."""
        with self.tap.shifted(r_adv):
            logits = forward()
        return divergence(problem_type)(clean_logits, logits)
