"""PGD: projected gradient descent on word embeddings (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018), in the form used by competition solutions for NLP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method


@register_method
class PGD(AdversarialMethod):
    """K ascent steps of alpha * g / ||g|| on the touched embedding rows, each projected onto the epsilon-ball.

    Step 1 uses the clean gradient of the micro-batch; steps 2..K use the gradient of the adversarial loss at the
    current perturbation, computed by `closure()` with `torch.autograd.grad` with respect to the embedding output
    only: no parameter gradient is computed and none is backed up. The caller's pass inside the block is the final
    adversarial forward and backward, whose gradient adds to the clean one, exactly as the classic competition
    implementation (which backs up and restores every gradient for the same effect) does.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): radius of the L2 ball over all touched rows.
        alpha (`float`, *optional*, defaults to `0.3`): size of each ascent step.
        steps (`int`, *optional*, defaults to `3`): K, the number of ascent steps (K - 1 extra forward passes).
    """

    name = "pgd"

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
        *,
        embedding_name: str | None = None,
        attach: bool = True,
    ):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        super().__init__(model, embedding_name=embedding_name, attach=attach)
        self.epsilon, self.alpha, self.steps = epsilon, alpha, steps

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None) -> Iterator[AttackResult]:
        if self.steps > 1 and closure is None:
            raise ValueError(
                f"PGD with steps={self.steps} needs a `closure` that runs the forward and returns the loss."
            )
        rows, grad = self.tap.captured_gradient()
        self.tap.reset()
        weight = self.tap.weight
        with torch.no_grad():
            backup = weight.index_select(0, rows)
        delta = None
        try:
            for step in range(self.steps):
                norm = grad.norm()
                if not is_usable_norm(norm):
                    break  # keep the perturbation reached so far (none on the first step)
                with torch.no_grad():
                    weight.index_add_(0, rows, (self.alpha * grad / norm).to(weight.dtype))
                    delta = weight.index_select(0, rows) - backup
                    delta_norm = delta.norm()
                    if delta_norm > self.epsilon:
                        delta = self.epsilon * delta / delta_norm
                    weight.index_copy_(0, rows, backup + delta)
                if step < self.steps - 1:
                    with torch.enable_grad():
                        loss = closure()
                    step_rows, grad = self.tap.gradient_of(loss)
                    self.tap.reset()
                    if not torch.equal(step_rows, rows):
                        raise RuntimeError("The PGD closure must run the forward on the same batch as the clean pass.")
            yield AttackResult(skipped=delta is None, norm=None if delta is None else delta.norm())
        finally:
            with torch.no_grad():
                weight.index_copy_(0, rows, backup)
            self.tap.reset()
