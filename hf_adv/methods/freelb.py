"""FreeLB: free large-batch adversarial training (Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural
Language Understanding", ICLR 2020)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..embedding import project_lookups
from ..losses import lookup_masks
from .base import AdversarialMethod, AttackResult, register_method
from .fgm import example_directions


@register_method
class FreeLB(AdversarialMethod):
    """K ascent steps on a per-position perturbation of the embedding output, the parameter gradients of all K
    perturbed passes accumulated (each loss divided by K): the model trains on the average loss along the ascent
    path, at the cost of K forward+backward passes, with no clean pass unless `clean_loss=True`.

    As in the authors' `run_glue_freelb.py` (L2 norm type): delta_0 is uniform in +-init_mag / sqrt(n_b * hidden)
    per element on the n_b real tokens of example b, zero on padding (zero everywhere when `init_mag` is 0); after
    each pass delta += alpha * g_b / ||g_b|| per example, g the gradient at the embedding output, then, when
    `max_norm > 0`, each example is projected onto the L2 ball of radius `max_norm`. The perturbation is added to
    the output of every lookup of the input embedding (per example over all its lookups); no weight is written.

    In the trainer, the K backward passes run without DDP synchronisation but the step's last, so gradients are
    all-reduced once per optimizer step; under gradient accumulation each is divided like any micro-batch loss.

    Args:
        model (`nn.Module`): the model.
        alpha (`float`, *optional*, defaults to `0.1`): the ascent step (the authors' `adv-lr`).
        steps (`int`, *optional*, defaults to `2`): K, the number of perturbed passes (`adv-steps`).
        init_mag (`float`, *optional*, defaults to `0.0`): size of the random start (`adv-init-mag`).
        max_norm (`float`, *optional*, defaults to `0.0`): L2 radius per example; 0 leaves it unbounded
            (`adv-max-norm`).
        clean_loss (`bool`, *optional*, defaults to `False`): also train on the clean loss (one more pass).

    Raises:
        `ValueError`: for a non-positive `alpha`, `steps < 1`, or a negative `init_mag` / `max_norm`.
    """

    name = "freelb"
    own_flags = ("adv_init_mag", "adv_max_norm", "freelb_clean_loss")
    clean_pass_flag = "freelb_clean_loss"
    # With `clean_loss`, the clean pass is back-propagated before the K passes: holding its graph for one backward
    # with the first pass would keep two graphs alive (+0.55 GB peak on MiniLM 16 x 128) for no saving.
    needs_clean_gradient = True
    metrics = ("adv_loss", "adv_perturbation_norm")
    summed_metrics = ()

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.1,
        steps: int = 2,
        *,
        init_mag: float = 0.0,
        max_norm: float = 0.0,
        clean_loss: bool = False,
        **kwargs,
    ):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        if not (init_mag >= 0 and max_norm >= 0):
            raise ValueError(f"init_mag and max_norm must be >= 0, got {init_mag} and {max_norm}.")
        super().__init__(model, **kwargs)
        self.alpha, self.steps, self.init_mag, self.max_norm = alpha, steps, init_mag, max_norm
        self.clean_loss = clean_loss
        self.trains_clean_pass = clean_loss

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {
            "alpha": args.adv_alpha,
            "steps": args.adv_steps,
            "init_mag": args.adv_init_mag,
            "max_norm": args.adv_max_norm,
            "clean_loss": args.freelb_clean_loss,
        }

    @classmethod
    def runs_clean_pass(cls, args) -> bool:
        return bool(args.freelb_clean_loss)

    @classmethod
    def describe(cls, args) -> str:
        clean = ", + clean loss" if args.freelb_clean_loss else ""
        bound = f", max norm {args.adv_max_norm}" if args.adv_max_norm > 0 else ""
        return f"freelb (K {args.adv_steps}, alpha {args.adv_alpha}, init {args.adv_init_mag}{bound}{clean})"

    def initial_delta(self, output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """delta_0 for one lookup's output (rows x sequence x hidden): zero, or the authors' scaled uniform start."""
        delta = torch.zeros(output.shape, device=output.device, dtype=torch.float32)
        if self.init_mag == 0:
            return delta
        if mask is None:
            mask = torch.ones(output.shape[:2], device=output.device)
        mask = mask.to(delta)
        delta.uniform_(-1, 1).mul_(mask.unsqueeze(-1))
        lengths = mask.sum(1).clamp_min(1)
        return delta * (self.init_mag / torch.sqrt(lengths * output.shape[-1])).view(-1, 1, 1)

    def train_step(self, step) -> None:
        """K passes on `step.labelled`, each `loss / K` back-propagated; the last one ends the method."""
        tap = self.tap
        batch = step.labelled
        deltas: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] | None = None

        def start(index: int, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            decoder = tap.is_decoder(tap.current_module)
            deltas.append(self.initial_delta(output, lookup_masks(batch, [output.shape], [decoder])[0]))
            return deltas[-1]

        total = None
        for k in range(self.steps):
            tap.reset()
            with tap.shifted(start if k == 0 else list(deltas)):
                loss = step.loss()
            step.backward(loss / self.steps, final=k == self.steps - 1)
            total = loss.detach() if total is None else total + loss.detach()
            if k == self.steps - 1:
                break
            if masks is None:
                masks = tap.padding_masks(batch)
            grads = [torch.zeros_like(d) if g is None else g.float() for d, g in zip(deltas, tap.output_grads)]
            directions, usable = example_directions(grads, masks)
            if usable:
                deltas = [d + self.alpha * u for d, u in zip(deltas, directions)]
                if self.max_norm > 0:
                    deltas = project_lookups(deltas, self.max_norm)
        tap.reset()
        mean = total / self.steps
        step.record("adv_loss", mean)
        step.record("adv_perturbation_norm", torch.stack([d.norm() for d in deltas]).norm() if deltas else None)
        if step.training_loss is None:
            step.training_loss = mean

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        raise NotImplementedError(
            "FreeLB trains on K perturbed passes, not one: use it through the trainer (adv_method='freelb'), or call "
            "`train_step` with a `hf_adv.step.TrainingStep`."
        )
