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
    """K ascent steps of alpha * g / ||g|| on offsets r of the touched embedding rows, each projected onto the
    epsilon-ball (L2 over all touched rows).

    Step 1 uses the clean gradient of the micro-batch; steps 2..K use the gradient of the adversarial loss at the
    current perturbation, computed by `closure()` with `torch.autograd.grad` with respect to the embedding output
    only: no parameter gradient is computed and none is backed up. The caller's pass inside the block is the final
    adversarial forward and backward, whose gradient adds to the clean one, exactly as the classic competition
    implementation (which backs up and restores every gradient for the same effect) does. As in `FGM`, r is added to
    the embedding output of every lookup of its row; no weight is written.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): radius of the L2 ball over all touched rows.
        alpha (`float`, *optional*, defaults to `0.3`): size of each ascent step.
        steps (`int`, *optional*, defaults to `3`): K, the number of ascent steps (K - 1 extra forward passes).

    Raises:
        `ValueError`: for a non-positive `epsilon` or `alpha`, or `steps < 1`.
    """

    name = "pgd"

    def __init__(self, model: nn.Module, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3, **kwargs):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        super().__init__(model, **kwargs)
        self.epsilon, self.alpha, self.steps = epsilon, alpha, steps

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {"epsilon": args.adv_epsilon, "alpha": args.adv_alpha, "steps": args.adv_steps}

    @classmethod
    def describe(cls, args) -> str:
        return f"pgd (epsilon {args.adv_epsilon}, alpha {args.adv_alpha}, {args.adv_steps} steps)"

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None) -> Iterator[AttackResult]:
        if self.steps > 1 and closure is None:
            raise ValueError(
                f"PGD with steps={self.steps} needs a `closure` that runs the forward and returns the loss."
            )
        tap = self.tap
        _, grad = tap.captured_gradient()
        # The lookups of every inner forward must be the clean pass's: their rows are found once.
        clean_ids, touched = list(tap.indices), tap.touched_rows()
        r = None
        deltas = None
        try:
            for step in range(self.steps):
                norm = grad.norm()
                if not is_usable_norm(norm):
                    break  # keep the perturbation reached so far (none on the first step)
                step_r = self.alpha * grad / norm
                r = step_r if r is None else r + step_r
                r_norm = r.norm()
                if r_norm > self.epsilon:
                    r = self.epsilon * r / r_norm
                deltas = tap.row_deltas(r, touched)
                if step < self.steps - 1:
                    tap.reset()
                    with torch.enable_grad(), tap.shifted(deltas):
                        loss = closure()
                    same = len(tap.indices) == len(clean_ids) and all(
                        a.shape == b.shape and torch.equal(a, b) for a, b in zip(tap.indices, clean_ids)
                    )
                    if not same:
                        raise RuntimeError("The PGD closure must run the forward on the same batch as the clean pass.")
                    _, grad = tap.gradient_of(loss, touched)
            tap.reset()
            if deltas is None:
                yield AttackResult(skipped=True)
            else:
                with tap.shifted(deltas):
                    yield AttackResult(norm=r.norm())
        finally:
            tap.reset()
