"""PGD: projected gradient descent on word embeddings (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018), in the form used by competition solutions for NLP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..embedding import ascent_step
from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method
from .fgm import check_scope, example_directions


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

    Example scope (Madry et al.'s per-example ball, as the robustness evaluation attacks): r is one offset per
    position, each step alpha * g_b / ||g_b|| per example over its real tokens, projected onto the L2 ball of radius
    epsilon per example; padding stays untouched.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): radius of the L2 ball over all touched rows.
        alpha (`float`, *optional*, defaults to `0.3`): size of each ascent step.
        steps (`int`, *optional*, defaults to `3`): K, the number of ascent steps (K - 1 extra forward passes).
        scope (`str`, *optional*, defaults to `"token"`): `"token"` (one ball over the batch's rows) or `"example"`
            (one ball per example).

    Raises:
        `ValueError`: for a non-positive `epsilon` or `alpha`, or `steps < 1`.
    """

    name = "pgd"
    own_flags = ("adv_scope",)

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
        *,
        scope: str = "token",
        **kwargs,
    ):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        self.scope = check_scope(scope)
        super().__init__(model, **kwargs)
        self.epsilon, self.alpha, self.steps = epsilon, alpha, steps

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {"epsilon": args.adv_epsilon, "alpha": args.adv_alpha, "steps": args.adv_steps, "scope": args.adv_scope}

    @classmethod
    def needs_input_gradient(cls, args) -> bool:
        """Whether it calls `torch.autograd.grad` (its inner steps), which reentrant checkpointing refuses."""
        return args.adv_steps > 1

    @classmethod
    def describe(cls, args) -> str:
        scope = ", example scope" if args.adv_scope == "example" else ""
        return f"pgd (epsilon {args.adv_epsilon}, alpha {args.adv_alpha}, {args.adv_steps} steps{scope})"

    def _check_same_lookups(self, clean_ids: list[torch.Tensor]) -> None:
        tap = self.tap
        same = len(tap.indices) == len(clean_ids) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(tap.indices, clean_ids)
        )
        if not same:
            raise RuntimeError("The PGD closure must run the forward on the same batch as the clean pass.")

    @contextlib.contextmanager
    def _perturbed_examples(self, closure, inputs) -> Iterator[AttackResult]:
        tap = self.tap
        grads = tap.captured_output_gradients()
        masks = tap.padding_masks(inputs)
        clean_ids = list(tap.indices)
        deltas = None
        try:
            for step in range(self.steps):
                directions, usable = example_directions(grads, masks)
                if not usable:
                    break  # keep the perturbation reached so far (none on the first step)
                deltas = ascent_step(deltas, directions, self.alpha, self.epsilon)
                if step < self.steps - 1:
                    tap.reset()
                    with torch.enable_grad(), tap.shifted(deltas):
                        loss = closure()
                    self._check_same_lookups(clean_ids)
                    grads = [
                        torch.zeros_like(o, dtype=torch.float32) if g is None else g.float()
                        for o, g in zip(tap.outputs, tap.output_gradients(loss))
                    ]
            tap.reset()
            if deltas is None:
                yield AttackResult(skipped=True)
            else:
                with tap.shifted(deltas):
                    yield AttackResult(norm=torch.stack([d.norm() for d in deltas]).norm())
        finally:
            tap.reset()

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        if self.steps > 1 and closure is None:
            raise ValueError(
                f"PGD with steps={self.steps} needs a `closure` that runs the forward and returns the loss."
            )
        if self.scope == "example":
            with self._perturbed_examples(closure, inputs) as attack:
                yield attack
            return
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
                    self._check_same_lookups(clean_ids)
                    _, grad = tap.gradient_of(loss, touched)
            tap.reset()
            if deltas is None:
                yield AttackResult(skipped=True)
            else:
                with tap.shifted(deltas):
                    yield AttackResult(norm=r.norm())
        finally:
            tap.reset()
