"""`AdversarialTrainingArguments`: `TrainingArguments` plus flat, documented fields for the adversarial methods.

Every field is a `--flag` of `HfArgumentParser`, so recipes and the CLI configure the same knobs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
import transformers
from transformers import TrainingArguments

from .losses import DIVERGENCE_CHOICES
from .methods import get_method_class, list_methods

SCOPES = ("token", "example")


def accelerator_available() -> bool:
    """Whether torch has an accelerator to pin memory for: what `DataLoader(pin_memory=True)` checks before warning
    that there is none."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (
        torch.cuda.is_available()
        or bool(xpu is not None and xpu.is_available())
        or bool(mps is not None and mps.is_available())
    )


def _method_flags() -> dict[str, tuple[str, ...]]:
    """Flags read by some registered methods only (`Method.own_flags`) -> the names of those methods."""
    owners: dict[str, list[str]] = {}
    for name in list_methods(None):
        for flag in get_method_class(name).own_flags:
            owners.setdefault(flag, []).append(name)
    return {flag: tuple(names) for flag, names in owners.items()}


@dataclass
class AdversarialTrainingArguments(TrainingArguments):
    # -- transformers fields whose default depends on the machine ----------------------------------------------------
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to pin memory in the DataLoaders. Default: on when torch has an accelerator (CUDA, XPU, "
            "MPS, ...), off on a CPU-only machine, where pinning does nothing and torch warns about it."
        },
    )
    # -- which attack ---------------------------------------------------------------------------------------------
    adv_method: str = field(
        default="none",
        metadata={
            "help": "The perturbation applied every training step, one of "
            + ", ".join(list_methods("perturbation"))
            + ". Regularizers (VAT, R-Drop) are enabled by their weight instead (vat_weight, rdrop_weight)."
        },
    )
    adv_scope: str = field(
        default="token",
        metadata={
            "help": "FGM/FGSM/PGD: token (one offset per vocabulary row the batch looks up, one L2 norm over the "
            "batch: the classic competition form) or example (one offset per position, L2-normalised per example "
            "over its real tokens, padding untouched: Miyato et al. 2017, FreeLB). In example scope adv_epsilon is "
            "an L2 norm per example of the embedding output, the units of robust_eval_epsilons."
        },
    )
    adv_fraction: float = field(
        default=1.0,
        metadata={
            "help": "FGM/FGSM: run the adversarial pass on this fraction of each micro-batch's rows "
            "(at least one), drawn at random every step (Kurakin et al. 2017's mix of clean and adversarial "
            "examples): the pass costs about that fraction of a plain one. 1.0: every row."
        },
    )
    adv_epsilon: float = field(
        default=1.0,
        metadata={
            "help": "FGM: L2 size of the embedding perturbation (over the batch's rows in token scope, per example in "
            "example scope). FGSM: its L-inf size. PGD: radius of the L2 ball. carry: L2 size of each step's new "
            "offsets over the batch's rows."
        },
    )
    adv_alpha: float = field(
        default=0.3, metadata={"help": "PGD: size of each ascent step. FreeLB: ascent step size (adv-lr)."}
    )
    adv_steps: int = field(
        default=3,
        metadata={
            "help": "PGD: number of ascent steps K (K - 1 extra forward passes). FreeLB: K, the number of "
            "forward+backward passes whose parameter gradients are averaged."
        },
    )
    adv_init_mag: float = field(
        default=0.0,
        metadata={
            "help": "FreeLB: size of the random start (uniform in +-adv_init_mag / sqrt(tokens * hidden) per "
            "element, zero on padding); 0 starts at the clean input."
        },
    )
    adv_max_norm: float = field(
        default=0.0,
        metadata={"help": "FreeLB: radius of the L2 ball per example the perturbation is projected onto; 0: none."},
    )
    freelb_clean_loss: bool = field(
        default=False,
        metadata={"help": "FreeLB: also train on the clean loss (one more pass), besides the K perturbed passes."},
    )
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
    vat_xi: float = field(
        default=10.0,
        metadata={
            "help": "VAT: L2 size per example of the probe direction in power iteration (embedding-output units)."
        },
    )
    vat_iterations: int = field(
        default=1,
        metadata={"help": "VAT: number of power iterations; more than 1 needs vat_xi below 1 (warned)."},
    )
    vat_divergence: str = field(
        default="auto",
        metadata={
            "help": "VAT: distance between clean and perturbed predictions. kl: softmax KL (single-label, multiple "
            "choice, token classification, language models); bernoulli: per-label sigmoid KL averaged over labels "
            "(multi-label); mse: squared error averaged over targets (regression). auto: from the model config's "
            "problem_type and num_labels, or for a model without a config from the labels (integer: kl; float 0/1 "
            "of the logits' shape: bernoulli; other float: mse)."
        },
    )
    # -- R-Drop ---------------------------------------------------------------------------------------------------
    rdrop_weight: float = field(
        default=0.0,
        metadata={
            "help": "R-Drop (Liang et al., NeurIPS 2021): weight alpha of the symmetric KL between the predictions of "
            "the clean pass and of a second pass with its own dropout mask (Bernoulli KL for multi-label, squared "
            "error for regression); the second pass's supervised loss is added too, as in the paper. 0 disables."
        },
    )
    # -- defensive distillation -------------------------------------------------------------------------------------
    distill_teacher: str | None = field(
        default=None,
        metadata={
            "help": "Defensive distillation (Papernot et al., IEEE S&P 2016): the folder of a trained classifier with "
            "the same labels (loaded with the model's class); the model is trained on its predictions softened at "
            "distill_temperature, and used at temperature 1. Combinable with every method: each pass's loss "
            "becomes the distillation loss. Default: no distillation."
        },
    )
    distill_temperature: float = field(
        default=20.0,
        metadata={
            "help": "Distillation: temperature T of the teacher's and the model's softmax (per-label sigmoids for "
            "multi-label) in training; the soft loss is multiplied by T^2 (Hinton et al. 2015). 20 is Papernot et "
            "al.'s value."
        },
    )
    distill_hard_weight: float = field(
        default=0.0,
        metadata={"help": "Distillation: weight of the loss on the true labels added to the soft loss (0: none)."},
    )
    distill_train_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Defensive distillation's first stage (Papernot et al. train the teacher at the temperature they "
            "distil at): train this model on its labels with its softmax (per-label sigmoids for multi-label) at "
            "temperature T, the loss multiplied by T so that its gradient keeps a cross-entropy's size; the model is "
            "used at temperature 1. Then distil from it with distill_teacher and distill_temperature T. 1: off."
        },
    )
    # -- semi-supervised training -----------------------------------------------------------------------------------
    unlabeled_ratio: float = field(
        default=1.0,
        metadata={
            "help": "With an unlabeled_dataset (semi-supervised VAT): unlabelled rows each batch carries per labelled "
            "row, e.g. 3 = three unlabelled per labelled row (a fraction is met on average). Epochs and max_steps "
            "still count labelled rows. Read only when the trainer is given unlabeled_dataset."
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
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = accelerator_available()
        if (
            int(transformers.__version__.split(".")[0]) < 5
            and isinstance(self.warmup_steps, float)
            and 0 < self.warmup_steps < 1
        ):
            # transformers 5 reads warmup_steps below 1 as a ratio of the total steps; 4.x wants an int there and
            # takes the ratio as warmup_ratio (which 5 no longer has).
            self.warmup_ratio, self.warmup_steps = self.warmup_steps, 0
        super().__post_init__()
        perturbations = list_methods("perturbation")
        regularizers = {name: get_method_class(name) for name in list_methods("regularizer")}
        if self.adv_method in regularizers:
            weight = regularizers[self.adv_method].weight_field
            raise ValueError(
                f"adv_method={self.adv_method!r}: {self.adv_method} is a regularizer, a loss term added to any "
                f"adv_method, not an adv_method; set {weight} > 0 (with adv_method='none' for it alone). "
                f"adv_method is one of {perturbations}."
            )
        if self.adv_method not in perturbations:
            close = difflib.get_close_matches(str(self.adv_method), perturbations, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"adv_method={self.adv_method!r} is not one of {perturbations}{hint}.")
        if self.adv_scope not in SCOPES:
            raise ValueError(f"adv_scope={self.adv_scope!r} is not one of {list(SCOPES)}.")
        for cls in regularizers.values():
            if not getattr(self, cls.weight_field) >= 0:
                raise ValueError(
                    f"{cls.weight_field} must be >= 0 (0 disables {cls.name}), got {getattr(self, cls.weight_field)}."
                )
        for name in ("adv_init_mag", "adv_max_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 < self.adv_fraction <= 1:
            raise ValueError(f"adv_fraction must be in (0, 1], got {self.adv_fraction}.")
        positive = {
            "adv_epsilon": self.adv_epsilon,
            "adv_alpha": self.adv_alpha,
            "awp_lr": self.awp_lr,
            "awp_eps": self.awp_eps,
            "vat_epsilon": self.vat_epsilon,
            "vat_xi": self.vat_xi,
        }
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}.")
        finite = ["adv_init_mag", "adv_max_norm"] + [get_method_class(n).weight_field for n in regularizers]
        for name in finite:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}.")
        for epsilon in self.robust_eval_epsilons or ():
            if not epsilon > 0:
                raise ValueError(f"robust_eval_epsilons must all be > 0, got {self.robust_eval_epsilons}.")
        for name in ("adv_steps", "vat_iterations", "robust_eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.vat_divergence not in DIVERGENCE_CHOICES:
            raise ValueError(f"vat_divergence={self.vat_divergence!r} is not one of {list(DIVERGENCE_CHOICES)}.")
        if self.adv_start_epoch is not None and self.adv_start_epoch < 0:
            raise ValueError(f"adv_start_epoch must be >= 0, got {self.adv_start_epoch}.")
        if self.adv_start_step < 0:
            raise ValueError(f"adv_start_step must be >= 0, got {self.adv_start_step}.")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be a finite number > 0, got {self.distill_temperature}.")
        if not (self.unlabeled_ratio > 0 and math.isfinite(self.unlabeled_ratio)):
            raise ValueError(f"unlabeled_ratio must be a finite number > 0, got {self.unlabeled_ratio}.")
        if not (self.distill_hard_weight >= 0 and math.isfinite(self.distill_hard_weight)):
            raise ValueError(f"distill_hard_weight must be a finite number >= 0, got {self.distill_hard_weight}.")
        if not (self.distill_train_temperature > 0 and math.isfinite(self.distill_train_temperature)):
            raise ValueError(
                f"distill_train_temperature must be a finite number > 0, got {self.distill_train_temperature}."
            )
        if self.distill_train_temperature != 1.0 and self.distill_teacher:
            raise ValueError(
                f"distill_train_temperature={self.distill_train_temperature:g} trains a teacher on its labels, and "
                f"distill_teacher={self.distill_teacher!r} trains a student on a teacher: one stage at a time (the "
                "student's temperature is distill_temperature)."
            )
        configured = self.configured_methods()
        for cls, _ in configured:
            cls.check_args(self)
        classes = [cls for cls, _ in configured]
        # A flag that only some methods read, set while none of them is configured, would be silently ignored.
        for name, owners in _method_flags().items():
            if getattr(self, name) != self.__dataclass_fields__[name].default and not any(
                cls.name in owners for cls in classes
            ):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is read only by the methods {list(owners)}, and the configured "
                    f"ones ({self.describe_methods()}) would ignore it. Configure one of those methods, or leave "
                    f"{name} at its default."
                )
        perturbation = next((cls for cls in classes if cls.kind == "perturbation"), None)
        if perturbation is not None and not perturbation.runs_clean_pass(self):
            for cls in classes:
                if getattr(cls, "needs_clean_graph", False):
                    raise ValueError(
                        f"{cls.weight_field}={getattr(self, cls.weight_field)} compares the clean pass with a second "
                        f"pass, and adv_method={self.adv_method!r} runs no clean pass"
                        + (f" unless {perturbation.clean_pass_flag}=True" if perturbation.clean_pass_flag else "")
                        + f". Set {cls.weight_field}=0"
                        + (f" or {perturbation.clean_pass_flag}=True." if perturbation.clean_pass_flag else ".")
                    )

    def configured_methods(self) -> list[tuple[type, str]]:
        """The method classes these arguments enable, with their description: the perturbation named by
        `adv_method`, then every registered regularizer whose weight flag is > 0."""
        classes = [get_method_class(self.adv_method)] if self.adv_method != "none" else []
        classes += [
            get_method_class(name) for name in list_methods("regularizer") if get_method_class(name).enabled(self)
        ]
        return [(cls, cls.describe(self)) for cls in classes]

    def describe_methods(self) -> str:
        """The configured methods in one phrase (`none` when there are none)."""
        return " + ".join(described for _, described in self.configured_methods()) or "none"

    @property
    def uses_unlabelled_rows(self) -> bool:
        """Whether a configured method learns from rows without labels (VAT): what unlabelled data needs."""
        return any(cls.uses_unlabelled_rows for cls, _ in self.configured_methods())

    def check_unlabeled_data(self, source: str = "unlabeled_dataset") -> None:
        """Refuse unlabelled data (named `source`) that no configured method would use.

        Raises:
            `ValueError`: when no configured method learns from unlabelled rows (VAT needs `vat_weight > 0`), or
                with persistent DataLoader workers.
        """
        if self.dataloader_num_workers > 0 and getattr(self, "dataloader_persistent_workers", False):
            raise ValueError(
                f"{source} with dataloader_persistent_workers=True: each worker would keep its copy of the training "
                "dataset, and so the first epoch's unlabelled rows, for every epoch. Set "
                "dataloader_persistent_workers=False."
            )
        if not self.uses_unlabelled_rows:
            users = [name for name in list_methods(None) if get_method_class(name).uses_unlabelled_rows]
            flags = [getattr(get_method_class(name), "weight_field", "") or "adv_method" for name in users]
            off = ", ".join(f"{flag}=0" for flag in flags)
            raise ValueError(
                f"{source} is given, but the configured methods ({self.describe_methods()}) do not learn from "
                f"unlabelled rows: only {', '.join(users)} does, and it is off ({off}). "
                f"Set {flags[0]} > 0 (e.g. {flags[0]}=1.0), or leave the unlabelled data out."
            )

    @property
    def adversarial(self) -> bool:
        """Whether any method is configured."""
        return bool(self.configured_methods())

    @property
    def resolved_start_epoch(self) -> float:
        if self.adv_start_epoch is not None:
            return self.adv_start_epoch
        return max((cls.default_start_epoch for cls, _ in self.configured_methods()), default=0.0)
