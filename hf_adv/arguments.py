"""`AdversarialTrainingArguments`: `TrainingArguments` plus flat, documented fields for the adversarial methods.

Every field is a `--flag` of `HfArgumentParser`, so recipes and the CLI configure the same knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers
from transformers import TrainingArguments

from .losses import DIVERGENCE_CHOICES
from .methods import get_method_class, list_methods


@dataclass
class AdversarialTrainingArguments(TrainingArguments):
    # -- which attack ---------------------------------------------------------------------------------------------
    adv_method: str = field(
        default="none",
        metadata={"help": "Adversarial method applied every training step: none, fgm, fgsm, pgd or awp."},
    )
    adv_epsilon: float = field(
        default=1.0,
        metadata={
            "help": "FGM: L2 size of the embedding perturbation. FGSM: its L-inf size. PGD: radius of the L2 ball."
        },
    )
    adv_alpha: float = field(default=0.3, metadata={"help": "PGD: size of each ascent step."})
    adv_steps: int = field(default=3, metadata={"help": "PGD: number of ascent steps K (K - 1 extra forward passes)."})
    adv_embedding_name: str | None = field(
        default=None,
        metadata={
            "help": "Name of the embedding weight to perturb (as in model.named_parameters()); default: the weight "
            "of model.get_input_embeddings()."
        },
    )
    # -- when it starts -------------------------------------------------------------------------------------------
    adv_start_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Train clean until this epoch (fractions allowed), then attack; applies to VAT too. Default: 0, "
            "except 1.0 for awp (AWP from the first step, on a fresh classifier head, can destroy fine-tuning)."
        },
    )
    adv_start_step: int = field(
        default=0,
        metadata={"help": "Train clean until this optimizer step, then attack (both starts must be reached)."},
    )
    # -- AWP ------------------------------------------------------------------------------------------------------
    awp_lr: float = field(default=1.0, metadata={"help": "AWP: step relative to each weight's norm (adv_lr)."})
    awp_eps: float = field(
        default=1e-3, metadata={"help": "AWP: relative bound, |w - w0| <= awp_eps * |w0| element-wise."}
    )
    awp_param_pattern: str | None = field(
        default=None,
        metadata={
            "help": "AWP: regular expression over parameter names to perturb; default: every weight matrix "
            "(2-D or more) that receives a gradient."
        },
    )
    awp_discard_clean_grad: bool = field(
        default=False,
        metadata={
            "help": "AWP: drop the clean gradient before the adversarial backward, as the classic snippet does."
        },
    )
    # -- VAT ------------------------------------------------------------------------------------------------------
    vat_weight: float = field(
        default=0.0, metadata={"help": "Weight of the VAT loss added to every step; 0 disables VAT."}
    )
    vat_epsilon: float = field(default=1.0, metadata={"help": "VAT: L2 size of the perturbation per example."})
    vat_xi: float = field(default=10.0, metadata={"help": "VAT: size of the probe direction in power iteration."})
    vat_iterations: int = field(default=1, metadata={"help": "VAT: number of power iterations."})
    vat_divergence: str = field(
        default="auto",
        metadata={
            "help": "VAT: distance between clean and perturbed predictions. kl: softmax KL (single-label, multiple "
            "choice, token classification, language models); bernoulli: per-label sigmoid KL summed over labels "
            "(multi-label); mse: squared error (regression). auto: from the model config's problem_type and "
            "num_labels, or for a model without a config from the labels (integer: kl; float 0/1 of the logits' "
            "shape: bernoulli; other float: mse)."
        },
    )
    # -- robustness in evaluate() -----------------------------------------------------------------------------------
    robust_eval_epsilons: list[float] | None = field(
        default=None,
        metadata={
            "help": "evaluate() also reports accuracy (micro-F1 for multi-label) under a PGD attack on the embedding "
            "output at each of these L2 radii per example, as eval_adv_accuracy@{eps}. Default: none."
        },
    )
    robust_eval_steps: int = field(
        default=5, metadata={"help": "PGD iterates of the robust_eval_epsilons attack (1 is FGM)."}
    )

    def __post_init__(self):
        if (
            int(transformers.__version__.split(".")[0]) < 5
            and isinstance(self.warmup_steps, float)
            and 0 < self.warmup_steps < 1
        ):
            # transformers 5 reads warmup_steps below 1 as a ratio of the total steps; 4.x wants an int there and
            # takes the ratio as warmup_ratio (which 5 no longer has).
            self.warmup_ratio, self.warmup_steps = self.warmup_steps, 0
        super().__post_init__()
        methods = list_methods()
        if self.adv_method == "vat":
            raise ValueError(
                "adv_method='vat': VAT is a loss term added to any adv_method, not an adv_method; set vat_weight > 0 "
                f"(with adv_method='none' for VAT alone). adv_method is one of {methods}."
            )
        if self.adv_method not in methods:
            raise ValueError(f"adv_method={self.adv_method!r} is not one of {methods}.")
        positive = {
            "adv_epsilon": self.adv_epsilon,
            "adv_alpha": self.adv_alpha,
            "awp_lr": self.awp_lr,
            "awp_eps": self.awp_eps,
            "vat_epsilon": self.vat_epsilon,
            "vat_xi": self.vat_xi,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        for epsilon in self.robust_eval_epsilons or ():
            if not epsilon > 0:
                raise ValueError(f"robust_eval_epsilons must all be > 0, got {self.robust_eval_epsilons}.")
        for name in ("adv_steps", "vat_iterations", "robust_eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.vat_divergence not in DIVERGENCE_CHOICES:
            raise ValueError(f"vat_divergence={self.vat_divergence!r} is not one of {list(DIVERGENCE_CHOICES)}.")
        if not self.vat_weight >= 0:
            raise ValueError(f"vat_weight must be >= 0 (0 disables VAT), got {self.vat_weight}.")
        if self.adv_start_epoch is not None and self.adv_start_epoch < 0:
            raise ValueError(f"adv_start_epoch must be >= 0, got {self.adv_start_epoch}.")
        if self.adv_start_step < 0:
            raise ValueError(f"adv_start_step must be >= 0, got {self.adv_start_step}.")

    @property
    def adversarial(self) -> bool:
        """Whether any adversarial term is configured."""
        return self.adv_method != "none" or self.vat_weight > 0

    @property
    def resolved_start_epoch(self) -> float:
        if self.adv_start_epoch is not None:
            return self.adv_start_epoch
        return get_method_class(self.adv_method).default_start_epoch if self.adv_method != "none" else 0.0
