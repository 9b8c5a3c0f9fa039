"""What every method shares, and the registry.

Two kinds of method, each a registered class in its own file of this package:

- a *perturbation* (`AdversarialMethod`: fgm, fgsm, pgd, awp, freelb, ...) adds adversarial passes to the training
  step, selected by `adv_method`;
- a *regularizer* (`Regularizer`: vat, rdrop, ...) adds a weighted term computed from the clean pass and extra
  forwards, enabled by its weight flag (`vat_weight`, `rdrop_weight`).

The trainer's step is: the clean pass, the perturbation's passes (`AdversarialMethod.train_step`), each regularizer's
term (`Regularizer.term`), the log. A method sees the step through `hf_adv.step.TrainingStep`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..embedding import EmbeddingTap, decoder_lookups, find_input_embedding, lookup_modules


@dataclass
class AttackResult:
    """What one attack did, yielded by `perturbed()`.

    Attributes:
        skipped (`bool`): no perturbation was applied because the gradient norm was 0, NaN or Inf (for example an
            fp16 overflow step that the GradScaler will skip anyway). The caller should not run the adversarial pass.
        norm (`torch.Tensor` or `None`): L2 norm of the applied perturbation (over all perturbed tensors).
    """

    skipped: bool = False
    norm: torch.Tensor | None = None


def is_usable_norm(norm: torch.Tensor) -> bool:
    """A gradient norm gives a direction only when it is finite and non-zero."""
    value = float(norm)
    return value != 0.0 and math.isfinite(value)


class Method:
    """What the registry, the arguments, the trainer and the recipes know of a method.

    Subclasses set `name` (the registry key, lower case), `kind`, and may override:

    - `args_kwargs(args)`: the constructor's keyword arguments from `AdversarialTrainingArguments`' flat flags;
    - `check_args(args)`: refuse a combination of flags (a `ValueError` naming the flag and the fix);
    - `describe(args)`: the method and its settings in one phrase, for logs and recipe summaries;
    - `default_start_epoch`: the epoch the trainer starts it at unless `adv_start_epoch` says otherwise;
    - `metrics` / `summed_metrics`: what it logs with the training loss (means over micro-batches; sums).
    """

    name: str = ""
    kind: str = ""
    # Methods that perturb the embedding output need the embedding hooks; AWP does not.
    uses_embedding: bool = True
    # Whether the method writes weights during the step (AWP, by design; restored bit for bit after its pass).
    moves_weights: bool = False
    default_start_epoch: float = 0.0
    # Whether the method's term uses the rows without labels (VAT): the trainer's `unlabeled_dataset` needs one.
    uses_unlabelled_rows: bool = False
    metrics: tuple[str, ...] = ()
    summed_metrics: tuple[str, ...] = ()
    # Flags of `AdversarialTrainingArguments` that only this method (and others declaring them) reads: setting one
    # while none of its methods is configured is refused, as it would be silently ignored.
    own_flags: tuple[str, ...] = ()

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {}

    @classmethod
    def needs_input_gradient(cls, args) -> bool:
        """Whether the method calls `torch.autograd.grad` on the embedding output (refused with reentrant gradient
        checkpointing)."""
        return False

    @classmethod
    def check_args(cls, args) -> None:
        """Raise a `ValueError` for flags this method cannot train with (called by `AdversarialTrainingArguments`)."""

    @classmethod
    def from_args(cls, model: nn.Module, args, **kwargs) -> Method:
        """The method configured by `AdversarialTrainingArguments` (`kwargs`: `embedding_name`, `attach`, ...)."""
        return cls(model, **cls.args_kwargs(args), **kwargs)

    @classmethod
    def describe(cls, args) -> str:
        return cls.name

    def _find_tap(
        self, model: nn.Module, embedding_name: str | None, attach: bool, embedding_argument: str, tap=None
    ) -> EmbeddingTap | None:
        if not self.uses_embedding:
            return None
        if tap is None:
            module, weight = find_input_embedding(model, embedding_name, argument=embedding_argument)
            tap = EmbeddingTap(module, weight, lookup_modules(model, module, weight))
            tap.decoder_modules = decoder_lookups(model, tap.modules)
            if attach:
                tap.attach()
        return tap

    def remove(self) -> None:
        """Remove the hooks from the model."""
        if self.tap is not None:
            self.tap.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AdversarialMethod(Method):
    """Base class of the perturbations: one micro-batch's clean gradient in, a perturbation applied and restored out.

    Use in a hand-written loop::

        method = FGM(model, epsilon=1.0)
        with method.capture():
            model(**batch).loss.backward()  # clean pass
            with method.perturbed() as attack:
                if not attack.skipped:
                    model(**batch).loss.backward()  # adversarial pass, gradients add to the clean ones
        optimizer.step()

    `capture()` may be left out when each optimizer step sees one micro-batch: the gradient of the last backward
    through the embedding is then used. Embedding methods never write a weight: the perturbation is added to the
    embedding output inside `perturbed()` only. AWP's weight perturbation is undone bit for bit when `perturbed()`
    exits, also on an exception.

    In the trainer, `train_step(step)` runs the method's passes after the clean pass (by default one adversarial
    pass inside `perturbed()`); a method that trains differently (FreeLB's K passes) overrides it.

    Args:
        model (`nn.Module`): the model (DDP, `torch.compile` and PEFT wrappers are looked through).
        embedding_name (`str`, *optional*): the embedding weight whose lookups are perturbed, by parameter name; by
            default the weight of `model.get_input_embeddings()`. Every `nn.Embedding` of the model that looks up
            that weight is hooked (an encoder-decoder's encoder and decoder embeddings).
        attach (`bool`, defaults to `True`): attach the embedding hooks now and keep them active until `remove()`.
            The trainer passes `False`, installs them inactive and activates them only inside its training step.
    """

    kind = "perturbation"
    metrics = ("adv_loss", "adv_perturbation_norm", "adv_skipped")
    summed_metrics = ("adv_skipped",)
    # Whether the step runs the clean pass (FreeLB without its clean loss trains on perturbed passes only).
    trains_clean_pass: bool = True
    # The flag that makes `runs_clean_pass` true, if any (named in refusals).
    clean_pass_flag: str = ""

    @classmethod
    def runs_clean_pass(cls, args) -> bool:
        """Whether the step runs the clean pass with these flags (a regularizer that compares with it needs it)."""
        return cls.trains_clean_pass

    # Whether the clean backward runs before `train_step` (FGM needs the clean gradient for its direction); when False
    # the clean loss is back-propagated with the method's first backward, one backward through two graphs.
    needs_clean_gradient: bool = True

    def __init__(
        self,
        model: nn.Module,
        *,
        embedding_name: str | None = None,
        attach: bool = True,
        embedding_argument: str = "embedding_name",
        tap: EmbeddingTap | None = None,
    ):
        self.model = model
        self.tap = self._find_tap(model, embedding_name, attach, embedding_argument, tap)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Wrap one micro-batch (its clean pass and its adversarial pass) so the attack sees only its gradient."""
        if self.tap is None:
            yield
            return
        with self.tap.attached():
            self.tap.reset()
            try:
                yield
            finally:
                self.tap.reset()

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        """Apply the perturbation computed from the captured gradient for the block, then restore.

        Args:
            closure (`Callable[[], torch.Tensor]`, *optional*): runs a forward pass and returns the loss; needed by
                multi-step methods (PGD) for their inner ascent steps.
            inputs (`dict`, *optional*): the batch; example scope reads its attention mask to leave padding
                untouched.
        """
        raise NotImplementedError

    def train_step(self, step) -> None:
        """The method's passes in the trainer's step, after the clean pass (`step`: a `hf_adv.step.TrainingStep`):
        one adversarial pass at the perturbation, its gradient added to the clean one."""
        with self.perturbed(lambda: step.loss() * step.grad_scale, inputs=step.labelled) as attack:
            step.record("adv_skipped", float(attack.skipped))
            if not attack.skipped:
                adv_loss = step.loss()
                step.backward(adv_loss)
                step.record("adv_loss", adv_loss)
                step.record("adv_perturbation_norm", attack.norm)


class Regularizer(Method):
    """Base class of the regularizers: a term added to the loss of every training step, weighted by the flag named
    `weight_field` (0 disables the method).

    `term(step)` returns the unweighted term for the micro-batch (a mean over its examples, or None when it was
    skipped); the trainer adds `weight * term` to the step's loss and logs the term as `{name}_loss`.
    """

    kind = "regularizer"
    weight_field: str = ""
    # Whether the term needs the clean pass's graph (R-Drop back-propagates through both dropout passes).
    needs_clean_graph: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float = 1.0,
        embedding_name: str | None = None,
        attach: bool = True,
        embedding_argument: str = "embedding_name",
        tap: EmbeddingTap | None = None,
    ):
        if not weight > 0:
            raise ValueError(f"{self.weight_field or 'weight'} must be > 0, got {weight}.")
        self.model = model
        self.weight = weight
        self.tap = self._find_tap(model, embedding_name, attach, embedding_argument, tap)

    @classmethod
    def enabled(cls, args) -> bool:
        return getattr(args, cls.weight_field, 0) > 0

    @classmethod
    def from_args(cls, model: nn.Module, args, **kwargs) -> Regularizer:
        return cls(model, weight=getattr(args, cls.weight_field), **cls.args_kwargs(args), **kwargs)

    def term(self, step) -> torch.Tensor | None:
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}
KINDS = ("perturbation", "regularizer")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its lower-case `name` (a perturbation as an `adv_method` value, a
    regularizer through its weight flag)."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}.")
    if cls.kind == "regularizer" and not cls.weight_field:
        raise ValueError(f"Regularizer {cls.__name__} must name its weight flag in `weight_field`.")
    _METHODS[cls.name] = cls
    return cls


def list_methods(kind: str | None = "perturbation") -> list[str]:
    """Registered method names. `kind="perturbation"` (the default): the values of `adv_method`, `none` first;
    `"regularizer"`: the regularizers; `None`: every method."""
    if kind is None:
        return sorted(_METHODS)
    names = sorted(name for name, cls in _METHODS.items() if cls.kind == kind)
    return ["none", *names] if kind == "perturbation" else names


def get_method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; valid names are {list_methods(None)}.")
    return _METHODS[name]
