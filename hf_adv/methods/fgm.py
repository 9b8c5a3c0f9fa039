"""FGM: the fast gradient method on word embeddings (Miyato et al., "Adversarial Training Methods for
Semi-Supervised Text Classification", ICLR 2017)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..embedding import example_norms, mask_lookups, normalize_lookups
from ..step import batch_size, select_rows
from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method

SCOPES = ("token", "example")


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {list(SCOPES)}.")
    return scope


def lookup_rows(index: torch.Tensor, lookup_rows: int, rows: int) -> torch.Tensor:
    """The rows of a lookup output (lookup_rows x ...) that belong to the batch rows `index`: the same rows, or for a
    multiple-choice batch flattened to rows * choices, each row's block of choices."""
    if lookup_rows == rows:
        return index
    if lookup_rows % rows:
        raise RuntimeError(f"A lookup of {lookup_rows} rows does not split into the batch's {rows} rows.")
    per = lookup_rows // rows
    return (index.unsqueeze(1) * per + torch.arange(per, device=index.device)).reshape(-1)


def example_directions(grads: list[torch.Tensor], masks: list) -> tuple[list[torch.Tensor], bool]:
    """Example scope: each lookup's gradient with padding zeroed, scaled to unit L2 norm per example (over the
    example's lookups together), and whether any example has a usable (finite, non-zero) gradient. Examples whose
    gradient is 0 or not finite get no perturbation."""
    grads = mask_lookups(grads, masks)
    norms = example_norms(grads)
    usable = [torch.isfinite(n) & (n > 0) for n in norms]
    grads = [torch.where(u.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g)) for g, u in zip(grads, usable)]
    return normalize_lookups(grads), bool(any(bool(u.any()) for u in usable))


@register_method
class FGM(AdversarialMethod):
    """Fast gradient method: one step r = epsilon * g / ||g||_2 along the gradient at the embedding.

    Token scope (the default, the classic competition form): g (rows x hidden) is the gradient of this micro-batch's
    loss with respect to the embedding rows the batch looks up, as `nn.Embedding`
    computes it (the classic snippet reads it from `weight.grad`). The perturbation is added to the embedding OUTPUT:
    every position that looks up row i gets r[i], which is what adding r to the weight rows would do, without
    writing the weight (a tied LM head and other users of the weight see it unchanged) and without a backup.

    Example scope (Miyato et al. 2017): g is the gradient at each position of the embedding output, padding zeroed,
    and each example gets epsilon * g_b / ||g_b||_2 over its own real tokens (and its other lookups): `epsilon` is then
    an L2 norm per example, the units of `robust_eval_epsilons`.

    fp16: under a GradScaler g arrives multiplied by the loss scale; g / ||g|| does not depend on that scale, and a
    step whose gradient overflowed (norm Inf or NaN) is skipped, as the scaler skips its optimizer step.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of r over all touched rows (token scope) or per
            example (example scope), in units of the embedding output.
        scope (`str`, *optional*, defaults to `"token"`): `"token"` or `"example"`.
        fraction (`float`, *optional*, defaults to `1.0`): in the trainer: the adversarial pass runs on this fraction
            of the micro-batch's rows (at least one), drawn at random every step, as Kurakin et al. ("Adversarial
            Machine Learning at Scale", ICLR 2017) mix clean and adversarial examples; its loss is the mean over
            those rows, and in token scope r covers the rows those examples look up, from their gradient alone. The
            pass then costs about `fraction` of a plain one.
        embedding_name (`str`, *optional*): see `AdversarialMethod`.
        attach (`bool`, *optional*, defaults to `True`): see `AdversarialMethod`.

    Raises:
        `ValueError`: when `epsilon <= 0`, `scope` is unknown, `fraction` is not in (0, 1], or the model has no
            input embedding.
    """

    name = "fgm"

    own_flags = ("adv_scope", "adv_fraction")

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, *, scope: str = "token", fraction: float = 1.0, **kwargs
    ):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        self.scope = check_scope(scope)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        super().__init__(model, **kwargs)
        self.epsilon, self.fraction = epsilon, fraction

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {"epsilon": args.adv_epsilon, "scope": args.adv_scope, "fraction": args.adv_fraction}

    @classmethod
    def describe(cls, args) -> str:
        scope = ", example scope" if args.adv_scope == "example" else ""
        fraction = f", on {args.adv_fraction:g} of the rows" if args.adv_fraction < 1 else ""
        return f"{cls.name} (epsilon {args.adv_epsilon}{scope}{fraction})"

    def train_step(self, step) -> None:
        """One adversarial pass; with `fraction < 1`, on that fraction of the rows (see the class docstring)."""
        if self.fraction >= 1:
            return super().train_step(step)
        tap, batch = self.tap, step.labelled
        rows = batch_size(batch)
        count = max(1, round(self.fraction * rows))
        device = tap.weight.device
        index = torch.randperm(rows, device=device)[:count].sort().values
        grads = tap.captured_output_gradients()
        picked = [lookup_rows(index, g.shape[0], rows) for g in grads]
        grads = [g.index_select(0, i) for g, i in zip(grads, picked)]
        if self.scope == "example":
            masks = [None if m is None else m.index_select(0, i) for m, i in zip(tap.padding_masks(batch), picked)]
            directions, usable = example_directions(grads, masks)
            deltas = [self.example_step(d) for d in directions] if usable else None
        else:  # one offset per vocabulary row the picked rows look up, from those rows' gradients only
            indices = [ids.index_select(0, i) for ids, i in zip(tap.indices, picked)]
            touched = tap.touched_rows(indices)
            _, grad = tap.rows_gradient(grads, touched, indices)
            norm = grad.norm()
            usable = is_usable_norm(norm)
            deltas = tap.row_deltas(self.step(grad, norm), touched, indices) if usable else None
        tap.reset()
        step.record("adv_skipped", float(not usable))
        if not usable:
            return None
        try:
            with tap.shifted(deltas):
                adv_loss = step.loss(select_rows(batch, index, rows))
        finally:
            tap.reset()
        step.backward(adv_loss)
        step.record("adv_loss", adv_loss)
        step.record("adv_perturbation_norm", torch.stack([d.norm() for d in deltas]).norm())
        return None

    def step(self, grad: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The perturbation of the touched rows for their gradient `grad` of L2 norm `norm`."""
        return self.epsilon * grad / norm

    def example_step(self, direction: torch.Tensor) -> torch.Tensor:
        """Example scope: the perturbation of one lookup for its unit-norm-per-example direction."""
        return self.epsilon * direction

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        """See `AdversarialMethod.perturbed`; `inputs`: the batch, whose attention mask marks the padding that example
        scope leaves untouched (without it, the lookup module's `padding_idx`)."""
        tap = self.tap
        if self.scope == "example":
            grads = tap.captured_output_gradients()
            directions, usable = example_directions(grads, tap.padding_masks(inputs))
            tap.reset()
            if not usable:
                yield AttackResult(skipped=True)
                return
            deltas = [self.example_step(d) for d in directions]
            try:
                with tap.shifted(deltas):
                    yield AttackResult(norm=torch.stack([d.norm() for d in deltas]).norm())
            finally:
                tap.reset()
            return
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
