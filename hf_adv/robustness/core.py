"""The model on a batch: the evaluator's forward and backward with a perturbation on the embedding output, its
loss, predictions and the per-example counts the metrics sum. Shared by the embedding and word attacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..losses import IGNORE_INDEX, MULTI_LABEL

LABEL_KEYS = ("labels", "label")


def epsilon_key(epsilon: float) -> str:
    """How an epsilon is written in metric names: `pgd_accuracy@0.5`, `adv_accuracy@1`."""
    return f"{epsilon:g}"


def select_rows(inputs: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The examples `index` of a batch of model inputs."""
    return {k: v[index] for k, v in inputs.items()}


ATTACK_LOSSES = ("ce", "margin")


def margin_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """The logit-difference loss of Carlini and Wagner ("Towards Evaluating the Robustness of Neural Networks", IEEE
    S&P 2017), summed over examples: max_{j != y} z_j - z_y for a single-label model (positive once the prediction is
    wrong); for a multi-label one, the sum over labels of -z for a true label and z for a false one. Unlike the
    cross-entropy it does not vanish on a saturated softmax, which is how defensive distillation hides the gradient
    (Carlini and Wagner, "Defensive Distillation is Not Robust to Adversarial Examples", 2016).

    Args:
        logits (`torch.Tensor`): (batch, num_labels).
        targets (`torch.Tensor`): class ids (batch,), or 0/1 (batch, num_labels) for multi-label.
    """
    if multi_label:
        return ((1 - 2 * targets.float()) * logits).sum()
    true = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, targets.view(-1, 1), float("-inf"))
    return (others.max(dim=1).values - true).sum()


class ModelOnBatch:
    """The model on one batch, for `RobustnessEvaluator` (which sets `model`, `tap`, `hidden_size`, `problem_type`,
    `passes` and `_depth`): no parameter gradient, and the model left as it was found."""

    # -- leaving the model as found -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Eval mode, no parameter gradients and the embedding hook for the block; every module's mode and every
        parameter's `requires_grad` are put back on exit (re-entrant)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._depth = 1
        try:
            self.model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with self.tap.attached():
                yield
        finally:
            self._depth = 0
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
            self.tap.reset()

    # -- the model on a batch -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.tap.weight.device

    def split_batch(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs on the model's device and labels, without the examples whose label is -100."""
        inputs, labels, _ = self._split(batch)
        return inputs, labels

    def _split(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if labels is None:
            raise ValueError(f"The batch has no labels (keys {sorted(batch)}): attacks maximize the loss on labels.")
        inputs = {
            k: v.to(self.device) for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)
        }
        labels = torch.as_tensor(labels).to(self.device)
        if self.problem_type == MULTI_LABEL:
            labels = labels.float()
            keep = (labels != IGNORE_INDEX).any(-1)
        else:
            labels = labels.long().reshape(-1)
            keep = labels != IGNORE_INDEX
        index = keep.nonzero().squeeze(1)
        if not keep.all():
            inputs, labels = select_rows(inputs, index), labels[index]
        return inputs, labels, index

    def _mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        return mask.unsqueeze(-1).float()

    def _call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.passes["forward"] += inputs["input_ids"].shape[0]
        outputs = self.model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return logits.float()

    def logits(self, inputs: dict[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with `delta` added to the embedding output, no gradient."""
        with self.prepared(), torch.no_grad():
            shift = self.tap.shifted(delta) if delta is not None else contextlib.nullcontext()
            with shift:
                return self._call(inputs)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The attack's loss summed over examples, so that each example's gradient is its own: the model's own loss
        (`attack_loss="ce"`: cross-entropy, or BCE for multi-label) or the logit margin (`"margin"`)."""
        if self.attack_loss == "margin":
            return margin_loss(logits, targets, self.problem_type == MULTI_LABEL)
        if self.problem_type == MULTI_LABEL:
            return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")
        return F.cross_entropy(logits, targets, reduction="sum")

    def logits_and_grads(
        self,
        inputs: dict[str, torch.Tensor],
        delta: torch.Tensor | None,
        targets: Sequence[torch.Tensor | Callable[[torch.Tensor], torch.Tensor]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits at `delta` and, for each target, the gradient of the loss with respect to the embedding output.

        A target may be a function of the (detached) logits, to attack the model's own prediction.
        """
        input_ids = inputs["input_ids"]
        if delta is None:
            delta = torch.zeros(*input_ids.shape, self.hidden_size, device=input_ids.device)
        delta = delta.detach().requires_grad_(True)
        with self.prepared(), torch.enable_grad(), self.tap.shifted(delta):
            logits = self._call(inputs)
            self.tap.reset()
            grads = []
            for i, target in enumerate(targets):
                target = target(logits.detach()) if callable(target) else target
                (grad,) = torch.autograd.grad(self._loss(logits, target), delta, retain_graph=i < len(targets) - 1)
                self.passes["backward"] += logits.shape[0]
                grads.append(grad)
        return logits.detach(), grads

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits > 0 if self.problem_type == MULTI_LABEL else logits.argmax(-1)

    def as_target(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction.float() if self.problem_type == MULTI_LABEL else prediction

    def errors(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Wrong labels per example: 0 or 1 for single-label models, the Hamming distance for multi-label ones."""
        if self.problem_type == MULTI_LABEL:
            return (prediction != (labels > 0.5)).sum(-1)
        return (prediction != labels).long()

    def flipped(self, prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.problem_type == MULTI_LABEL:
            return (prediction != reference).any(-1).long()
        return (prediction != reference).long()

    def max_errors(self, labels: torch.Tensor) -> int:
        return labels.shape[-1] if self.problem_type == MULTI_LABEL else 1

    def counts(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per example, what the metric sums: (correct, 1, 0) for accuracy, (tp, fp, fn) for micro-F1."""
        if self.problem_type == MULTI_LABEL:
            truth = labels > 0.5
            rows = [(prediction & truth).sum(-1), (prediction & ~truth).sum(-1), (~prediction & truth).sum(-1)]
            return torch.stack(rows, dim=-1).double()
        correct = (prediction == labels).double()
        return torch.stack([correct, torch.ones_like(correct), torch.zeros_like(correct)], dim=-1)

    def metric(self, counts: torch.Tensor) -> float:
        a, b, c = (float(x) for x in counts)
        if self.problem_type == MULTI_LABEL:
            return 2 * a / (2 * a + b + c) if a + b + c > 0 else 0.0
        return a / b if b > 0 else float("nan")
