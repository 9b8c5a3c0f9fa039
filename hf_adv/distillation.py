"""Distillation from a teacher's temperature-softened predictions: defensive distillation (Papernot et al.,
"Distillation as a Defense to Adversarial Perturbations against Deep Neural Networks", IEEE S&P 2016), on the
knowledge-distillation loss of Hinton et al. ("Distilling the Knowledge in a Neural Network", 2015).

The student is trained on the teacher's predictions at temperature T: softmax(z_teacher / T) as the target of
softmax(z_student / T) (for a multi-label model, per-label sigmoids at temperature T), and used at temperature 1.
Papernot et al. train at T = 20 (on images); the student then learns logits about T times larger, whose softmax is
saturated, so that a gradient attack on the cross-entropy sees almost no gradient. Carlini and Wagner ("Defensive
Distillation is Not Robust to Adversarial Examples", 2016) showed that an attack on the logits (a margin loss) is not
fooled by it: evaluate a distilled model with `attack_loss="margin"` too (`hf_adv.robustness`).

The soft loss is multiplied by T^2 (Hinton et al.), so that its gradient keeps the size of a cross-entropy's at any
temperature; `hard_weight` adds the user's own loss on the labels (at temperature 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import unwrap_model
from .losses import MULTI_LABEL, REGRESSION, SINGLE_LABEL, find_logits, infer_problem_type


class Distillation:
    """The distillation loss of a student model against a frozen teacher.

    Args:
        teacher (`nn.Module`): a trained classifier with the student's labels; put in eval mode with no parameter
            gradient. Its predictions are computed without gradient, on the clean inputs.
        problem_type (`str` or `None`): the student's, `"single_label_classification"` or
            `"multi_label_classification"`; None: inferred from the labels of each batch, as transformers does (class
            ids: single-label; float targets: multi-label).
        temperature (`float`, *optional*, defaults to `20.0`): T, Papernot et al.'s value.
        hard_weight (`float`, *optional*, defaults to `0.0`): weight of the user's loss on the labels, added to the
            soft loss (0: the soft labels alone, as in Papernot et al.).

    Raises:
        `ValueError`: for a temperature <= 0, a negative `hard_weight`, or a problem type other than single- or
            multi-label classification.
    """

    def __init__(
        self, teacher: nn.Module, problem_type: str | None, temperature: float = 20.0, hard_weight: float = 0.0
    ):
        if not temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {temperature}.")
        if not hard_weight >= 0:
            raise ValueError(f"distill_hard_weight must be >= 0, got {hard_weight}.")
        if problem_type not in (SINGLE_LABEL, MULTI_LABEL, None):
            raise ValueError(
                f"Distillation needs a classification model (single- or multi-label), not problem_type="
                f"{problem_type!r}."
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.problem_type = problem_type
        self.temperature = float(temperature)
        self.hard_weight = float(hard_weight)
        self._cache: tuple[list, torch.Tensor] | None = None

    @classmethod
    def from_args(cls, model: nn.Module, args, teacher: nn.Module | None = None) -> Distillation | None:
        """The distillation `args` configure (`distill_teacher`, `distill_temperature`, `distill_hard_weight`), or
        None without a teacher. `teacher` (a module) takes the place of loading `args.distill_teacher`.

        Raises:
            `ValueError`: when the teacher cannot be loaded, is the student itself, or predicts another number of
                labels.
        """
        student = unwrap_model(model)
        train_temperature = getattr(args, "distill_train_temperature", 1.0)
        if teacher is None and not args.distill_teacher and train_temperature != 1.0:
            return TemperatureTraining(_problem_type_of(student), train_temperature)
        if teacher is None:
            if not args.distill_teacher:
                for name in ("distill_temperature", "distill_hard_weight"):
                    if getattr(args, name) != type(args).__dataclass_fields__[name].default:
                        raise ValueError(
                            f"{name}={getattr(args, name)!r} is read only with a distillation teacher, and there is "
                            "none: set distill_teacher to a trained checkpoint (or pass teacher_model=...), or leave "
                            f"{name} at its default."
                        )
                return None
            teacher = _load_teacher(student, args.distill_teacher)
        teacher = unwrap_model(teacher)
        if teacher is student:
            raise ValueError("The distillation teacher is the model being trained; pass a separate trained model.")
        config = getattr(student, "config", None)
        problem_type = _problem_type_of(student)
        student_labels = getattr(config, "num_labels", None)
        teacher_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
        if student_labels is not None and teacher_labels is not None and student_labels != teacher_labels:
            raise ValueError(
                f"The distillation teacher predicts {teacher_labels} labels and the student {student_labels}: "
                "distil from a teacher trained on the same labels."
            )
        device = next((p.device for p in student.parameters()), None)
        if device is not None:
            teacher.to(device)
        return cls(teacher, problem_type, args.distill_temperature, args.distill_hard_weight)

    @staticmethod
    def describe(args) -> str | None:
        """The distillation `args` configure, in one phrase for logs and summaries (None without a teacher path or
        a training temperature)."""
        train_temperature = getattr(args, "distill_train_temperature", 1.0)
        if train_temperature != 1.0:
            return f"trained at temperature {train_temperature:g} (defensive distillation's teacher)"
        if not getattr(args, "distill_teacher", None):
            return None
        hard = f", hard-label weight {args.distill_hard_weight:g}" if args.distill_hard_weight else ""
        return f"distillation from {args.distill_teacher} (temperature {args.distill_temperature:g}{hard})"

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits on `batch` (its model inputs), without gradient; the last batch's are kept, so the
        passes of one step that see the same rows run the teacher once."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label", "label_ids")}
        # The same tensor objects (held here, so their memory cannot be reused by another batch's).
        key = [(k, v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]
        if self._cache is not None and len(self._cache[0]) == len(key):
            if all(k == j and v is w for (k, v), (j, w) in zip(key, self._cache[0])):
                return self._cache[1]
        with torch.no_grad():
            logits = find_logits(self.teacher(**inputs))
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = logits.detach().float()
        self._cache = (key, logits)
        return logits

    def soft_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, problem_type: str | None = None
    ) -> torch.Tensor:
        """T^2 x KL(teacher || student) between the predictions at temperature T, mean over examples (for
        multi-label: the Bernoulli KL of each label's sigmoid, mean over labels and examples). Its gradient is the
        cross-entropy's (the teacher's entropy is a constant), and it is 0 when the student matches the teacher.

        Args:
            student_logits (`torch.Tensor`): (batch, num_labels), with their graph.
            teacher_logits (`torch.Tensor`): (batch, num_labels).
            problem_type (`str`, *optional*): overrides `self.problem_type`.
        """
        t = self.temperature
        student = student_logits.float() / t
        teacher = teacher_logits.float() / t
        if (problem_type or self.problem_type) == MULTI_LABEL:
            p = torch.sigmoid(teacher)
            kl = p * (F.logsigmoid(teacher) - F.logsigmoid(student)) + (1 - p) * (
                F.logsigmoid(-teacher) - F.logsigmoid(-student)
            )
            loss = kl.mean()
        else:
            log_p = F.log_softmax(teacher, dim=-1)
            loss = (log_p.exp() * (log_p - F.log_softmax(student, dim=-1))).sum(-1).mean()
        return loss * t * t

    def loss(self, student_logits: torch.Tensor, batch: dict, hard_loss: torch.Tensor) -> torch.Tensor:
        """The training loss of one pass: the soft loss on `batch`'s rows plus `hard_weight` x the user's loss."""
        if isinstance(student_logits, tuple):
            student_logits = student_logits[0]
        problem_type = _batch_problem_type(self.problem_type, student_logits, batch)
        soft = self.soft_loss(student_logits, self.teacher_logits(batch), problem_type)
        return soft + self.hard_weight * hard_loss if self.hard_weight else soft


class TemperatureTraining:
    """Defensive distillation's first stage (Papernot et al. 2016, section IV): the teacher is trained on its labels
    with its softmax at temperature T, T x CE(softmax(z / T), y) (for a multi-label model T x BCE(sigmoid(z / T), y),
    mean over labels); the factor T keeps the gradient with respect to the logits the size of a cross-entropy's at
    T = 1, so the learning rate needs no change. The model learns logits about T times larger, and is used at T = 1.
    The trainer uses it in place of `Distillation` (`distill_train_temperature`); the user's loss is not used.

    Args:
        problem_type (`str` or `None`): as `Distillation`'s.
        temperature (`float`): T, > 0.

    Raises:
        `ValueError`: for a temperature <= 0, or a problem type other than single- or multi-label classification.
    """

    teacher = None

    def __init__(self, problem_type: str | None, temperature: float):
        if not temperature > 0:
            raise ValueError(f"distill_train_temperature must be > 0, got {temperature}.")
        if problem_type not in (SINGLE_LABEL, MULTI_LABEL, None):
            raise ValueError(
                f"Training at a temperature needs a classification model (single- or multi-label), not "
                f"problem_type={problem_type!r}."
            )
        self.problem_type = problem_type
        self.temperature = float(temperature)

    def loss(self, logits: torch.Tensor, batch: dict, hard_loss: torch.Tensor | None = None) -> torch.Tensor:
        """T x the cross-entropy (BCE for multi-label) of `logits / T` against `batch`'s labels, mean over rows."""
        if isinstance(logits, tuple):
            logits = logits[0]
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError("Training at a temperature needs the batch's labels, under the key 'labels'.")
        problem_type = _batch_problem_type(self.problem_type, logits, batch)
        scaled = logits.float() / self.temperature
        if problem_type == MULTI_LABEL:
            loss = F.binary_cross_entropy_with_logits(scaled, labels.to(scaled.dtype))
        else:
            loss = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), labels.reshape(-1))
        return loss * self.temperature


def _problem_type_of(model: nn.Module) -> str | None:
    """The model config's problem type; None (left to the labels) when the config does not say."""
    config = getattr(model, "config", None)
    # transformers infers multi-label from float labels when the config does not say.
    return getattr(config, "problem_type", None) or (REGRESSION if getattr(config, "num_labels", None) == 1 else None)


def _batch_problem_type(problem_type: str | None, logits: torch.Tensor, batch: dict) -> str:
    """`problem_type`, or when None the one the labels of `batch` show (class ids: single-label; float of the
    logits' shape: multi-label); a regression's labels are refused."""
    if problem_type is not None:
        return problem_type
    labels = batch.get("labels")
    problem_type = infer_problem_type(None, labels if isinstance(labels, torch.Tensor) else None)
    if isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.shape != logits.shape:
        problem_type = REGRESSION
    if problem_type == REGRESSION:
        raise ValueError(
            "Distillation needs a classification model; these labels (float, not of the logits' shape) are a "
            "regression's. Set the model config's problem_type if it is a classifier."
        )
    return problem_type


def _load_teacher(student: nn.Module, path: str) -> nn.Module:
    """The teacher from `path`: with the student's class when the checkpoint is of the student's architecture, else
    with `AutoModelForSequenceClassification` (a BERT student may learn from a RoBERTa teacher)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
        student_type = getattr(getattr(student, "config", None), "model_type", None)
        load = getattr(type(student), "from_pretrained", None)
        if load is None or config.model_type != student_type:
            load = AutoModelForSequenceClassification.from_pretrained
        return load(path)
    except (OSError, ValueError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"distill_teacher={path!r} could not be loaded as a sequence classifier: {message} Pass the folder of a "
            "trained checkpoint (the output_dir of a finished run), or the loaded teacher as `teacher_model=`."
        ) from error
