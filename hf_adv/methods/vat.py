"""VAT: virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A Regularization Method for
Supervised and Semi-Supervised Learning", TPAMI 2018; for text, "Adversarial Training Methods for Semi-Supervised
Text Classification", ICLR 2017)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..embedding import EmbeddingTap, find_input_embedding, lookup_modules
from ..losses import DIVERGENCE_CHOICES


def normalize_per_example(d: torch.Tensor) -> torch.Tensor:
    """Scale each example (first dimension) of `d` to unit L2 norm over all its other dimensions."""
    norms = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return d / norms.view(-1, *([1] * (d.dim() - 1)))


def normalize_lookups(ds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`normalize_per_example` over the embedding outputs of one forward: when every lookup has the same number of
    rows (a siamese model's two texts, an encoder-decoder's two sides), example b's norm is taken over all its
    lookups together; otherwise each lookup is normalized on its own."""
    if len(ds) == 1 or len({d.shape[0] for d in ds}) != 1:
        return [normalize_per_example(d) for d in ds]
    norms = torch.stack([d.flatten(1).norm(dim=1) for d in ds]).norm(dim=0).clamp_min(1e-12)
    return [d / norms.view(-1, *([1] * (d.dim() - 1))) for d in ds]


class VAT:
    """Local distributional smoothness, LDS = D(p(x) || p(x + r_adv)), on the output of the input embedding.

    r_adv comes from power iteration: a random direction d (shaped like the embedding outputs of the batch), scaled
    to `xi` per example; the gradient of D(p(x) || p(x + d)) with respect to d (and only d: `torch.autograd.grad`,
    no parameter gradient) becomes the next d; after `iterations` rounds r_adv = epsilon * d / ||d|| per example. D
    is chosen by `divergence`: the softmax KL (`kl`, single-label classification, multiple choice, token
    classification and language models), the sum of per-label Bernoulli KLs (`bernoulli`, multi-label), or the
    squared error between predictions (`mse`, regression); per-token predictions are averaged over real tokens only.
    LDS needs no labels, so unlabelled examples contribute to it.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of r_adv per example, in units of the embedding
            output.
        xi (`float`, *optional*, defaults to `10.0`): size of d during power iteration.
        iterations (`int`, *optional*, defaults to `1`): power iterations.
        divergence (`str`, *optional*, defaults to `"auto"`): one of `auto`, `kl`, `bernoulli`, `mse`; `auto` reads
            the model's config or, without one, the labels (see `hf_adv.losses.resolve_divergence`).

    Raises:
        `ValueError`: for a non-positive `epsilon` or `xi`, `iterations < 1`, or an unknown `divergence`.
    """

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        xi: float = 10.0,
        iterations: int = 1,
        *,
        divergence: str = "auto",
        embedding_name: str | None = None,
        attach: bool = True,
        tap: EmbeddingTap | None = None,
        embedding_argument: str = "embedding_name",
    ):
        if not epsilon > 0:
            raise ValueError(f"vat epsilon must be > 0, got {epsilon}.")
        if not xi > 0:
            raise ValueError(f"vat xi must be > 0, got {xi}.")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"vat iterations must be an integer >= 1, got {iterations!r}.")
        if divergence not in DIVERGENCE_CHOICES:
            raise ValueError(f"vat_divergence={divergence!r} is not one of {list(DIVERGENCE_CHOICES)}.")
        self.epsilon, self.xi, self.iterations, self.divergence = epsilon, xi, iterations, divergence
        if tap is None:
            module, weight = find_input_embedding(model, embedding_name, argument=embedding_argument)
            tap = EmbeddingTap(module, weight, lookup_modules(model, module, weight))
            if attach:
                tap.attach()
        self.tap = tap

    @classmethod
    def from_args(cls, model: nn.Module, args, **kwargs) -> VAT:
        """VAT configured by `AdversarialTrainingArguments` (`vat_*` flags)."""
        return cls(
            model,
            epsilon=args.vat_epsilon,
            xi=args.vat_xi,
            iterations=args.vat_iterations,
            divergence=args.vat_divergence,
            **kwargs,
        )

    @staticmethod
    def describe(args) -> str:
        return f"vat (weight {args.vat_weight}, epsilon {args.vat_epsilon})"

    def remove(self) -> None:
        self.tap.detach()

    def sample_noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The random start of power iteration (seeded by the global torch RNG)."""
        return torch.randn(shape, device=like.device, dtype=torch.float32)

    def adversarial_direction(
        self,
        forward: Callable[[], torch.Tensor],
        clean_logits: torch.Tensor,
        shapes: Sequence[torch.Size],
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scale: float = 1.0,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor] | None:
        """r_adv for the batch, one tensor per embedding lookup of a forward, or None when power iteration produced
        a non-finite or zero direction.

        Args:
            forward: runs the model on the batch (without labels) and returns its logits.
            clean_logits: logits of the clean forward on the same batch.
            shapes: the shapes of the embedding outputs of one forward (batch x sequence x hidden for each lookup).
            distance: D(clean_logits, logits), a scalar (see `hf_adv.losses.divergence`).
            scale: multiplies the divergence before `autograd.grad` (the fp16 loss scale keeps the small
                gradients from underflowing; the direction does not depend on it).
            masks: for each lookup, None or its batch x sequence mask of real tokens: the random start is zero on
                padding, as in Miyato et al.'s code, so that padding takes no share of the probe's norm.
        """
        like = clean_logits[0] if isinstance(clean_logits, tuple) else clean_logits
        ds = [self.sample_noise(tuple(shape), like) for shape in shapes]
        if masks is not None:
            ds = [d if m is None else d * m.unsqueeze(-1).to(d) for d, m in zip(ds, masks)]
        for _ in range(self.iterations):
            ds = [(self.xi * d).requires_grad_(True) for d in normalize_lookups(ds)]
            with torch.enable_grad(), self.tap.shifted(ds):
                logits = forward()
            grads = torch.autograd.grad(distance(clean_logits, logits) * scale, ds, allow_unused=True)
            ds = [torch.zeros_like(d) if g is None else g for d, g in zip(ds, grads)]
        self.tap.reset()
        norms = torch.stack([d.flatten(1).norm(dim=1).sum() for d in ds])
        if not torch.isfinite(norms).all() or not (norms > 0).any():
            return None
        return [self.epsilon * d for d in normalize_lookups(ds)]

    def loss(
        self,
        forward: Callable[[], torch.Tensor],
        clean_logits: torch.Tensor,
        r_adv: Sequence[torch.Tensor],
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """LDS at the perturbation `r_adv`; differentiable with respect to the parameters."""
        with self.tap.shifted(list(r_adv)):
            logits = forward()
        self.tap.reset()
        return distance(clean_logits, logits)
