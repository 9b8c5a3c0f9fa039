"""`TrainingStep`: what a method sees of one micro-batch's training step.

The trainer builds one per micro-batch and hands it to the perturbation (`AdversarialMethod.train_step`) and to each
regularizer (`Regularizer.term`). Through it a method runs the user's loss code on its own copy of the batch, reads the
model's outputs, back-propagates on the right scale for gradient accumulation, with the DDP all-reduce in the step's
last backward only, and logs.

Scales: `loss()` returns the micro-batch's loss as a mean over its examples (tokens for token-level losses), whatever
normalisation the loss code used; `backward(x)` back-propagates `x / gradient_accumulation_steps`. A method therefore
adds terms on one scale and never divides for accumulation itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .embedding import EmbeddingTap, unwrap_model
from .losses import (
    IGNORE_INDEX,
    divergence,
    find_logits,
    prediction_positions,
    resolve_divergence,
    unlabelled_rows,
)


def select_rows(inputs: dict, index: torch.Tensor, batch_size: int) -> dict:
    """The batch restricted to the rows `index` (every tensor whose first dimension is the batch)."""
    return {
        k: v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
        for k, v in inputs.items()
    }


def _label_count(batch: dict) -> int:
    """Labels other than -100 in `batch` (0 without labels)."""
    labels = batch.get("labels")
    return int((labels != IGNORE_INDEX).sum()) if isinstance(labels, torch.Tensor) else 0


def _valid_labels(batch: dict) -> dict:
    """`batch` with the labels of its unlabelled rows (every label -100) set to 0, for a forward whose loss is not
    used; `batch` itself when it has none."""
    labels = batch.get("labels")
    missing = unlabelled_rows(labels)
    if missing is None:
        return batch
    rows = missing.reshape(-1, *([1] * (labels.dim() - 1)))
    return {**batch, "labels": labels.masked_fill(rows, 0)}


def batch_size(inputs: dict) -> int:
    """The number of rows of a batch: the first dimension of its labels or input ids."""
    for key in ("labels", "input_ids", "attention_mask"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim())


class TrainingStep:
    """One micro-batch's training step, as the methods see it.

    Attributes:
        model (`nn.Module`): the model as the Trainer wraps it (DDP, compiled, ...).
        inputs (`dict`): the whole micro-batch, prepared for the device.
        labelled (`dict` or `None`): the rows with at least one label other than -100 (`inputs` itself when every
            row is labelled, None when none is): the batch of the supervised passes.
        tap (`EmbeddingTap` or `None`): the input-embedding hooks, active during the step.
        grad_scale (`float`): the fp16 GradScaler's scale (1.0 without one): multiply a loss by it before a
            `torch.autograd.grad` so that fp16 gradients do not underflow (directions do not depend on it).
        clean_outputs: the model's outputs in the clean pass (with their graph), or None when the step ran no clean
            pass or nothing captured them; they are those of `labelled`.
        clean_shapes (`list[torch.Size]`): the embedding output shapes of the clean pass.
        training_loss (`torch.Tensor` or `None`): the loss the step reports (the clean loss, or the perturbation's
            when it replaces the clean pass), on the micro-batch-mean scale.
    """

    def __init__(
        self,
        trainer,
        model: nn.Module,
        inputs: dict,
        labelled: dict | None,
        *,
        num_items_in_batch=None,
        accumulation: int = 1,
        loss_is_scaled: bool = False,
        grad_scale: float = 1.0,
        tap: EmbeddingTap | None = None,
        outputs_capture=None,
        distillation=None,
        backward: Callable[[torch.Tensor, bool, bool], None],
        record: Callable[[str, torch.Tensor | float | None], None],
    ):
        self.trainer = trainer
        self.model = model
        self.inputs = inputs
        self.labelled = labelled
        self.num_items_in_batch = num_items_in_batch
        self.accumulation = accumulation
        # `loss_is_scaled`: the loss code divides by `num_items_in_batch` (a token-level loss, `compute_loss_func`),
        # so its loss is `mean / accumulation`, and a pass on some of the rows gets a count scaled to those rows, so
        # that its loss is their mean; otherwise the loss is the micro-batch mean.
        self._to_mean = accumulation if loss_is_scaled else 1
        self._normalized_by_items = loss_is_scaled
        self.grad_scale = grad_scale
        self.tap = tap
        self._capture = outputs_capture
        self.distillation = distillation
        self._backward = backward
        self._record = record
        self.clean_outputs = None
        self.clean_shapes: list[torch.Size] | None = None
        self.clean_is_decoder: list[bool] | None = None
        self.training_loss: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._retain_pending = False
        self._final_component = False
        self.synced = False

    # -- the user's loss code ----------------------------------------------------------------------------------------
    def loss(self, batch: dict | None = None, *, distill: bool = True) -> torch.Tensor:
        """The user's `compute_loss` on a shallow copy of `batch` (default: the labelled rows), as a mean over the
        micro-batch. With distillation (and `distill`), the distillation loss of the same forward instead, the
        user's loss weighted by `distill_hard_weight` in it."""
        batch = self.labelled if batch is None else batch
        if distill and self.distillation is not None:
            with self._capture.capturing() as capture:
                hard = self.loss(batch, distill=False)
            if capture.outputs is None:
                raise ValueError(
                    "Distillation needs the model's logits, but `compute_loss` did not call the model given to the "
                    f"trainer ({type(unwrap_model(self.model)).__name__})."
                )
            return self.distillation.loss(find_logits(capture.outputs), batch, hard)
        trainer = self.trainer
        num_items = self.num_items_in_batch
        if (
            self._normalized_by_items
            and num_items is not None
            and batch is not self.labelled
            and batch is not self.inputs
        ):
            whole, part = _label_count(self.labelled), _label_count(batch)
            if whole:
                num_items = num_items * (part / whole)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(self.model, dict(batch), num_items_in_batch=num_items)
        return loss if self._to_mean == 1 else loss * self._to_mean

    def loss_and_outputs(self, batch: dict | None = None, *, need_loss: bool = True):
        """`loss(batch)` and the model's outputs in that forward, however the user's loss code called the model (a
        forward hook on the model keeps them).

        Raises:
            `ValueError`: when the loss code did not call the model given to the trainer.
        """
        if self._capture is None:
            raise RuntimeError("This trainer captures no model outputs: no configured method asked for them.")
        with self._capture.capturing() as capture:
            loss = self.loss(batch, distill=need_loss)
        if capture.outputs is None:
            raise ValueError(
                "The regularizer needs the model's predictions, but `compute_loss` did not call the model given to "
                "the "
                f"trainer ({type(unwrap_model(self.model)).__name__})."
            )
        return loss, capture.outputs

    def outputs(self, batch: dict | None = None):
        """The model's outputs when the user's loss code runs on (a copy of) `batch` (default: the whole
        micro-batch). Its loss is not used, so the labels of unlabelled rows (all -100) are 0 in that copy: loss
        code that indexes by label (a focal loss's `gather`, `one_hot`, class weights) would fail on -100."""
        return self.loss_and_outputs(_valid_labels(self.inputs if batch is None else batch), need_loss=False)[1]

    def logits(self, batch: dict | None = None):
        return find_logits(self.outputs(batch))

    def divergence(self, name: str, logits, batch: dict | None = None, *, symmetric: bool = False):
        """The distance `name` (kl, bernoulli, mse) between predictions of `batch` (default: the whole micro-batch),
        averaged over examples or real positions (`hf_adv.losses.divergence`)."""
        batch = self.inputs if batch is None else batch
        config = getattr(unwrap_model(self.model), "config", None)
        decoder = bool(getattr(config, "is_encoder_decoder", False))
        return divergence(name, prediction_positions(batch, logits, decoder), symmetric=symmetric)

    def resolve_divergence(self, setting: str, logits, batch: dict | None = None) -> str:
        """`setting` (auto, kl, bernoulli, mse) resolved from the model's config or, without one, the labels."""
        batch = self.inputs if batch is None else batch
        config = getattr(unwrap_model(self.model), "config", None)
        clean = logits[0] if isinstance(logits, tuple) else logits
        return resolve_divergence(setting, config, batch.get("labels"), clean)

    # -- gradients ---------------------------------------------------------------------------------------------------
    def hold(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Keep `loss` (the clean loss) to back-propagate with the next `backward()`: one backward through both
        graphs instead of two. `retain_graph`: when a method needs the clean gradient first (`flush()`), keep the
        clean graph after that backward, for a later term that differentiates through it (R-Drop)."""
        self._pending, self._retain_pending = loss, retain_graph

    def flush(self, *, sync: bool = False) -> None:
        """Back-propagate a held loss now (a method needs its gradient before its own passes). `sync`: this is the
        step's last backward, which runs the DDP all-reduce."""
        if self._pending is not None:
            loss, retain = self._pending, self._retain_pending
            self._pending = None
            self._backward(loss / self.accumulation, sync, retain)
            self.synced = self.synced or sync

    def backward(self, loss: torch.Tensor, *, final: bool = True) -> None:
        """Back-propagate `loss / gradient_accumulation_steps` (with a held clean loss). `final`: the method's last
        backward in this step; the last of the step's components runs the DDP all-reduce in it."""
        if self._pending is not None:
            # One backward through the held clean graph and this one: nothing is left that needs the clean graph.
            loss = self._pending + loss
            self._pending = None
        sync = final and self._final_component
        self._backward(loss / self.accumulation, sync, False)
        self.synced = self.synced or sync

    def record(self, name: str, value: torch.Tensor | float | None) -> None:
        """Log `value` under `name` with the training loss (see the method's `metrics`)."""
        self._record(name, value)

    @contextlib.contextmanager
    def component(self, final: bool):
        """The trainer marks the component that runs last: its final backward carries the all-reduce."""
        self._final_component = final
        try:
            yield self
        finally:
            self._final_component = False
