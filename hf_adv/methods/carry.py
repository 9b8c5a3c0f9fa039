"""Carried FGM: one forward+backward per step, at an FGM perturbation computed from earlier steps' gradients, in the
spirit of free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019: the perturbation
is updated from the same backward that gives the weight gradients, so it costs no extra pass)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method


@register_method
class CarriedFGM(AdversarialMethod):
    """Token-scope FGM whose perturbation comes from the previous steps instead of an extra pass.

    Shafahi et al. replay each minibatch m times and update the perturbation from each replay's backward; here the
    perturbation lives on vocabulary rows (the token scope of `FGM`), so it carries over between different batches
    without replay: every step runs ONE forward+backward, at delta[b, t] = r[row(b, t)] with r the rows' stored
    offsets, and that backward's row gradient g (rows x hidden, of the loss at the perturbed input) sets the touched
    rows' offsets for the steps that follow: r[rows] = epsilon * g / ||g||_2 (one L2 norm over the batch's rows, as
    FGM). A row never seen keeps offset 0, so the first step is clean. The model trains on the perturbed loss only
    (no clean pass): cost about one plain step, memory one float32 copy of the embedding matrix (vocab x hidden).

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of each step's new offsets over the touched rows.

    Raises:
        `ValueError`: for a non-positive `epsilon` or a model without an input embedding.
    """

    name = "carry"
    trains_clean_pass = False
    needs_clean_gradient = False

    def __init__(self, model: nn.Module, epsilon: float = 1.0, **kwargs):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        super().__init__(model, **kwargs)
        self.epsilon = epsilon
        self.offsets: torch.Tensor | None = None  # vocab x hidden, float32, created at the first step

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {"epsilon": args.adv_epsilon}

    @classmethod
    def check_args(cls, args) -> None:
        if args.adv_scope != "token":
            raise ValueError(
                f"adv_method='carry' with adv_scope={args.adv_scope!r}: its offsets live on vocabulary rows to carry "
                "over between batches, so it has token scope only. Use adv_scope='token'."
            )

    @classmethod
    def describe(cls, args) -> str:
        return f"carry (epsilon {args.adv_epsilon})"

    def train_step(self, step) -> None:
        tap = self.tap
        weight = tap.weight
        if self.offsets is None or self.offsets.device != weight.device:
            self.offsets = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        offsets = self.offsets

        def applied(index: int, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            return offsets[ids]

        tap.reset()
        with tap.shifted(applied):
            loss = step.loss()
        step.backward(loss)
        step.record("adv_loss", loss)
        if step.training_loss is None:
            step.training_loss = loss.detach()
        rows, grad = tap.captured_gradient()
        delta_norm = torch.stack([offsets[ids].norm() for ids in tap.indices]).norm()
        norm = grad.norm()
        skipped = not is_usable_norm(norm)
        step.record("adv_skipped", float(skipped))
        step.record("adv_perturbation_norm", delta_norm)
        if not skipped:
            offsets[rows] = self.epsilon * grad / norm
        tap.reset()

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        raise NotImplementedError(
            "Carried FGM has no adversarial pass of its own: use it through the trainer (adv_method='carry')."
        )
