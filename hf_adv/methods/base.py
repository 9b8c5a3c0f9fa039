"""What every adversarial method shares: finding the embedding, capturing a micro-batch's gradient, restoring."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..embedding import EmbeddingTap, find_input_embedding, lookup_modules


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


class AdversarialMethod:
    """Base class: one micro-batch's clean gradient in, a perturbation applied and restored out.

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

    Args:
        model (`nn.Module`): the model (DDP, `torch.compile` and PEFT wrappers are looked through).
        embedding_name (`str`, *optional*): the embedding weight whose lookups are perturbed, by parameter name; by
            default the weight of `model.get_input_embeddings()`. Every `nn.Embedding` of the model that looks up
            that weight is hooked (an encoder-decoder's encoder and decoder embeddings).
        attach (`bool`, defaults to `True`): attach the embedding hooks now and keep them active until `remove()`.
            The trainer passes `False`, installs them inactive and activates them only inside its training step.
    """

    name: str = ""
    # Methods that perturb the embedding output need the embedding hooks; AWP does not.
    uses_embedding: bool = True
    # The epoch the trainer starts the method at unless `adv_start_epoch` says otherwise.
    default_start_epoch: float = 0.0

    @classmethod
    def args_kwargs(cls, args) -> dict:
        """The constructor's keyword arguments from `AdversarialTrainingArguments`' flat flags."""
        return {}

    @classmethod
    def from_args(cls, model: nn.Module, args, **kwargs) -> AdversarialMethod:
        """The method configured by `AdversarialTrainingArguments` (`kwargs`: `embedding_name`, `attach`, ...)."""
        return cls(model, **cls.args_kwargs(args), **kwargs)

    @classmethod
    def describe(cls, args) -> str:
        """The method and its settings in one phrase, for logs and recipe summaries."""
        return cls.name

    def __init__(
        self,
        model: nn.Module,
        *,
        embedding_name: str | None = None,
        attach: bool = True,
        embedding_argument: str = "embedding_name",
    ):
        self.model = model
        self.tap: EmbeddingTap | None = None
        if self.uses_embedding:
            module, weight = find_input_embedding(model, embedding_name, argument=embedding_argument)
            self.tap = EmbeddingTap(module, weight, lookup_modules(model, module, weight))
            if attach:
                self.tap.attach()

    def remove(self) -> None:
        """Remove the hook from the model."""
        if self.tap is not None:
            self.tap.detach()

    def __enter__(self) -> AdversarialMethod:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

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
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None) -> Iterator[AttackResult]:
        """Apply the perturbation computed from the captured gradient for the block, then restore.

        Args:
            closure (`Callable[[], torch.Tensor]`, *optional*): runs a forward pass and returns the loss; needed by
                multi-step methods (PGD) for their inner ascent steps.
        """
        raise NotImplementedError


_METHODS: dict[str, type[AdversarialMethod]] = {}


def register_method(cls: type[AdversarialMethod]) -> type[AdversarialMethod]:
    """Class decorator: make a method available by its lower-case `name`."""
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names accepted by `adv_method`, `none` first."""
    return ["none", *sorted(_METHODS)]


def get_method_class(name: str) -> type[AdversarialMethod]:
    if name not in _METHODS:
        raise ValueError(f"Unknown adversarial method {name!r}; valid names are {list_methods()}.")
    return _METHODS[name]
