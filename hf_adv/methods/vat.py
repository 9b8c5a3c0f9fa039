"""VAT: virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A Regularization Method for
Supervised and Semi-Supervised Learning", TPAMI 2018; for text, "Adversarial Training Methods for Semi-Supervised
Text Classification", ICLR 2017)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ..embedding import mask_lookups, normalize_lookups, normalize_per_example
from ..losses import DIVERGENCE_CHOICES, detach, find_logits, lookup_masks
from .base import Regularizer, register_method

__all__ = ["VAT", "normalize_lookups", "normalize_per_example"]

logger = logging.get_logger(__name__)

# A probe this large (in units of the embedding output: a BERT-family token has a norm of about 1, a 128-token
# review about 12.5) makes a second power iteration start where the prediction has already moved, and the direction
# it returns is no longer adversarial (benchmarks/vat_probe.py, one trained IMDB MiniLM, 32 reviews: LDS at epsilon 1
# fell from 0.73 after one iteration at xi 10 to 0.004 after two, and at xi 1 from 0.51 to 0.40; at xi 0.1 to 0.5 a
# second iteration raised it, 0.53 to 0.55-0.57).
LARGE_PROBE = 1.0


@register_method
class VAT(Regularizer):
    """Local distributional smoothness, LDS = D(p(x) || p(x + r_adv)), on the output of the input embedding.

    r_adv comes from power iteration: a random direction d (shaped like the embedding outputs of the batch), scaled
    to `xi` per example; the gradient of D(p(x) || p(x + d)) with respect to d (and only d: `torch.autograd.grad`,
    no parameter gradient) becomes the next d; after `iterations` rounds r_adv = epsilon * d / ||d|| per example. D
    is chosen by `divergence`: the softmax KL (`kl`, single-label classification, multiple choice, token
    classification and language models), the per-label Bernoulli KL averaged over the labels (`bernoulli`,
    multi-label), or the squared error between predictions (`mse`, regression); per-token predictions are averaged
    over real tokens only.
    LDS needs no labels, so unlabelled examples contribute to it.

    In the trainer (`vat_weight > 0`) the term is `vat_weight * LDS`; the clean predictions are those of the clean
    pass, and when no perturbation needs the clean gradient first, the clean loss and the LDS are back-propagated in
    one backward (the power iteration's probe gradient is taken with `torch.autograd.grad`, computing no parameter
    gradient).

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L2 size of r_adv per example, in units of the embedding
            output.
        xi (`float`, *optional*, defaults to `10.0`): L2 size of d per example during power iteration, in units of the
            embedding output. 10 (with one iteration) is the widely used PyTorch port's value: a large probe that on
            MiniLM finds a more adversarial direction at epsilon 1 than a small one (`benchmarks/vat_probe.py`).
        iterations (`int`, *optional*, defaults to `1`): power iterations. More than one needs `xi` below 1: from
            `xi >= 1` the second iteration's direction is no longer adversarial, and a warning says so.
        divergence (`str`, *optional*, defaults to `"auto"`): one of `auto`, `kl`, `bernoulli`, `mse`; `auto` reads
            the model's config or, without one, the labels (see `hf_adv.losses.resolve_divergence`).

    Raises:
        `ValueError`: for a non-positive `epsilon` or `xi`, `iterations < 1`, or an unknown `divergence`.
    """

    name = "vat"
    uses_unlabelled_rows = True
    own_flags = ("vat_epsilon", "vat_xi", "vat_iterations", "vat_divergence")
    weight_field = "vat_weight"
    metrics = ("vat_loss", "vat_skipped")
    summed_metrics = ("vat_skipped",)

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        xi: float = 10.0,
        iterations: int = 1,
        *,
        divergence: str = "auto",
        weight: float = 1.0,
        **kwargs,
    ):
        if not epsilon > 0:
            raise ValueError(f"vat epsilon must be > 0, got {epsilon}.")
        if not xi > 0:
            raise ValueError(f"vat xi must be > 0, got {xi}.")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"vat iterations must be an integer >= 1, got {iterations!r}.")
        if divergence not in DIVERGENCE_CHOICES:
            raise ValueError(f"vat_divergence={divergence!r} is not one of {list(DIVERGENCE_CHOICES)}.")
        super().__init__(model, weight=weight, **kwargs)
        self.epsilon, self.xi, self.iterations, self.divergence = epsilon, xi, iterations, divergence
        self.resolved_divergence: str | None = None  # `divergence` resolved for the model at the first step
        if iterations > 1 and xi >= LARGE_PROBE:
            # Once per process and message: a trainer with `model_init` builds its methods again at every `train()`.
            logger.warning_once(
                f"VAT with iterations (vat_iterations) {iterations} and xi (vat_xi) {xi}: from a probe of "
                f"{LARGE_PROBE} or more, in embedding-output units, a second power iteration loses the adversarial "
                "direction (README, VAT). Keep one iteration with the default xi 10, the most adversarial setting "
                f"measured, or use xi below {LARGE_PROBE} (0.1 to 0.5 measured) with several iterations."
            )

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {
            "epsilon": args.vat_epsilon,
            "xi": args.vat_xi,
            "iterations": args.vat_iterations,
            "divergence": args.vat_divergence,
        }

    @classmethod
    def needs_input_gradient(cls, args) -> bool:
        return True

    @classmethod
    def describe(cls, args) -> str:
        return f"vat (weight {args.vat_weight}, epsilon {args.vat_epsilon})"

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
            ds = mask_lookups(ds, masks)
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

    def term(self, step) -> torch.Tensor | None:
        """`weight * LDS` over the whole micro-batch (unlabelled rows included), or None when power iteration gave
        no direction (logged as `vat_skipped`)."""
        inputs = step.inputs
        clean_outputs, shapes, decoder = step.clean_outputs, step.clean_shapes, step.clean_is_decoder
        if clean_outputs is None or step.labelled is not inputs:
            # Unlabelled rows (or no clean pass): clean predictions of the whole batch, without a graph.
            self.tap.reset()
            with torch.no_grad():
                clean_outputs = step.outputs(inputs)
            shapes, decoder = self.tap.output_shapes(), self.tap.output_is_decoder()
            self.tap.reset()
        clean_logits = detach(find_logits(clean_outputs))
        if self.resolved_divergence is None:
            self.resolved_divergence = step.resolve_divergence(self.divergence, clean_logits, inputs)
        distance = step.divergence(self.resolved_divergence, clean_logits, inputs)

        def forward():
            return step.logits(inputs)

        r_adv = self.adversarial_direction(
            forward, clean_logits, shapes, distance, step.grad_scale, lookup_masks(inputs, shapes, decoder)
        )
        step.record("vat_skipped", float(r_adv is None))
        if r_adv is None:
            return None
        lds = self.loss(forward, clean_logits, r_adv, distance)
        step.record("vat_loss", lds)
        return self.weight * lds
