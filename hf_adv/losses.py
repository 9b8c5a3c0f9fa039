"""What the trainer reads from a model's outputs, and VAT's divergences between clean and perturbed predictions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"

# `vat_divergence` values: the problem type each divergence belongs to.
DIVERGENCES = {"kl": SINGLE_LABEL, "bernoulli": MULTI_LABEL, "mse": REGRESSION}
DIVERGENCE_CHOICES = ("auto", *DIVERGENCES)


def infer_problem_type(config, labels: torch.Tensor | None) -> str:
    """The model's `problem_type`, or what transformers would infer from the labels on the first forward."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type:
        return problem_type
    if getattr(config, "num_labels", 2) == 1:
        return REGRESSION
    if labels is None or labels.dtype in (torch.long, torch.int):
        return SINGLE_LABEL
    return MULTI_LABEL


Logits = torch.Tensor | tuple[torch.Tensor, ...]


def detach(logits: Logits) -> Logits:
    return tuple(t.detach() for t in logits) if isinstance(logits, tuple) else logits.detach()


def find_logits(outputs) -> Logits:
    """The logits (predictions) in a model's outputs: the tensor itself, the `logits` entry of a dict or
    `ModelOutput` (else its `*_logits` entries as a tuple, as question-answering heads return `start_logits` and
    `end_logits`), or the first tensor of a tuple after a leading scalar loss.

    Raises:
        `ValueError`: when the outputs hold no such tensor.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        # Several heads (question answering: start_logits and end_logits): one prediction per head.
        heads = tuple(v for k, v in outputs.items() if k.endswith("_logits") and isinstance(v, torch.Tensor))
        if heads:
            return heads
        raise ValueError(
            f"VAT needs the model's predictions, but its output is a {type(outputs).__name__} with keys "
            f"{sorted(outputs)} and no 'logits'. Return a logits tensor, a tuple with the logits first (after the "
            "loss, if any), or a dict with 'logits'; and set vat_divergence to kl, bernoulli or mse."
        )
    if isinstance(outputs, (tuple, list)):
        tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
        if tensors and tensors[0].dim() == 0:
            tensors = tensors[1:]
        if tensors:
            return tensors[0]
    raise ValueError(
        f"VAT needs the model's predictions, but its output is a {type(outputs).__name__} holding no logits tensor. "
        "Return a logits tensor, a tuple with the logits first, or a dict with 'logits'; and set vat_divergence to "
        "kl, bernoulli or mse."
    )


def resolve_divergence(setting: str, config, labels: torch.Tensor | None, logits: torch.Tensor) -> str:
    """The divergence VAT uses: `setting` unless it is `"auto"`, then from the model's config (`problem_type`,
    `num_labels == 1` for regression) as transformers decides its own loss, and for a model without a config from
    the labels: integer labels -> kl; float labels of the logits' shape, all 0 or 1 -> bernoulli; other float labels
    -> mse.

    Raises:
        `ValueError`: when `"auto"` cannot decide (a model without a config, and no labels in the batch).
    """
    if setting != "auto":
        return setting
    if isinstance(logits, tuple):
        logits = logits[0]
    if config is not None and (getattr(config, "problem_type", None) or hasattr(config, "num_labels")):
        return {v: k for k, v in DIVERGENCES.items()}.get(infer_problem_type(config, labels), "kl")
    if labels is None:
        raise ValueError(
            "vat_divergence='auto' cannot tell what this model predicts: it has no config and the batch has no "
            "labels. Set vat_divergence to 'kl' (softmax classes), 'bernoulli' (one sigmoid per label) or 'mse' "
            "(regression)."
        )
    if not labels.is_floating_point():
        return "kl"
    known = labels[labels != IGNORE_INDEX]
    if labels.shape == logits.shape and logits.shape[-1] > 1 and bool(((known == 0) | (known == 1)).all()):
        return "bernoulli"
    return "mse"


def softmax_kl(clean_logits: torch.Tensor, logits: torch.Tensor, *, detach: bool = True) -> torch.Tensor:
    """KL(softmax(clean) || softmax(logits)) over the last dimension, one value per prediction. `detach=False`
    also differentiates through `clean_logits` (R-Drop)."""
    clean = clean_logits.detach() if detach else clean_logits
    clean_log_p = F.log_softmax(clean.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (clean_log_p.exp() * (clean_log_p - log_q)).sum(-1)


def bernoulli_kl(clean_logits: torch.Tensor, logits: torch.Tensor, *, detach: bool = True) -> torch.Tensor:
    """Per-label Bernoulli KL(sigmoid(clean) || sigmoid(logits)), averaged over the labels (the last dimension), as
    the multi-label BCE loss averages: so a divergence weight means the same against the supervised loss for any
    number of labels."""
    clean = (clean_logits.detach() if detach else clean_logits).float()
    logits = logits.float()
    p = torch.sigmoid(clean)
    kl = p * (F.logsigmoid(clean) - F.logsigmoid(logits)) + (1 - p) * (F.logsigmoid(-clean) - F.logsigmoid(-logits))
    return kl.mean(-1)


def squared_error(clean_outputs: torch.Tensor, outputs: torch.Tensor, *, detach: bool = True) -> torch.Tensor:
    """Squared error between clean and perturbed predictions, averaged over the targets (the last dimension), as
    the regression MSE loss averages."""
    clean = clean_outputs.detach() if detach else clean_outputs
    return (outputs.float() - clean.float()).square().mean(-1)


_PER_PREDICTION = {"kl": softmax_kl, "bernoulli": bernoulli_kl, "mse": squared_error}


def divergence(
    name: str, positions: torch.Tensor | None = None, *, symmetric: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """D(clean, perturbed) averaged over examples, or over the real positions of per-token predictions.

    By default the clean predictions are a fixed target (VAT: no gradient flows into them). `symmetric=True` gives
    (D(a, b) + D(b, a)) / 2 differentiated through both (R-Drop's two dropout passes); for `mse`, the squared error
    differentiated through both.

    Args:
        name (`str`): `kl`, `bernoulli` or `mse`.
        positions (`torch.Tensor`, *optional*): batch x sequence mask (1 for a real token) of per-token predictions
            (logits of shape batch x sequence x classes); the mean is then over the masked-in positions only, so
            padding changes nothing. Ignored for logits whose first two dimensions do not match it.
    """
    per_prediction = _PER_PREDICTION[name]
    if name == "mse" and positions is not None:
        positions = None  # regression heads predict per example (batch x targets); nothing to mask

    def distance(clean_logits: Logits, logits: Logits) -> torch.Tensor:
        if isinstance(clean_logits, tuple):  # one prediction per head: the sum of their divergences
            return sum(distance(c, p) for c, p in zip(clean_logits, logits))
        if clean_logits.dim() == 1 and name == "mse":  # a squeezed single-target regressor: batch
            clean_logits, logits = clean_logits.unsqueeze(-1), logits.unsqueeze(-1)
        if not symmetric:
            values = per_prediction(clean_logits, logits)
        elif name == "mse":
            values = per_prediction(clean_logits, logits, detach=False)
        else:
            values = 0.5 * (
                per_prediction(clean_logits, logits, detach=False) + per_prediction(logits, clean_logits, detach=False)
            )
        if positions is not None and values.dim() == 2 and values.shape == positions.shape:
            mask = positions.to(values.dtype)
            return (values * mask).sum() / mask.sum().clamp_min(1.0)
        return values.mean()

    return distance


def prediction_positions(inputs: Mapping, logits: torch.Tensor, decoder: bool = False) -> torch.Tensor | None:
    """The mask of real positions for per-token logits (batch x sequence x classes): the decoder attention mask, the
    attention mask (not for a `decoder`'s logits: an encoder-decoder's predictions are at the decoder's positions),
    or the labels that are not -100, whichever matches the logits' first two dimensions."""
    if isinstance(logits, tuple) or logits.dim() != 3:
        return None
    for key in ("decoder_attention_mask",) if decoder else ("decoder_attention_mask", "attention_mask"):
        mask = inputs.get(key)
        if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:2]:
            return mask
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:2]:
        return labels != IGNORE_INDEX
    return None


def lookup_masks(inputs: Mapping, shapes, decoder: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
    """For each embedding lookup (output shape rows x sequence x hidden), the mask of its real positions: for an
    encoder's (or a decoder-only model's) lookup the batch's attention mask when its positions are the lookup's (a
    multiple-choice mask is flattened to rows x sequence); for a `decoder`'s lookup (an encoder-decoder's) the
    decoder attention mask, or else the labels that are not -100; else None."""
    masks = []
    decoder = list(decoder) if decoder is not None else [False] * len(shapes)
    labels = inputs.get("labels")
    for shape, is_decoder in zip(shapes, decoder):
        found = None
        if is_decoder:
            real_labels = labels != IGNORE_INDEX if isinstance(labels, torch.Tensor) else None
            candidates = [inputs.get("decoder_attention_mask"), real_labels]
        else:
            candidates = [inputs.get("attention_mask"), inputs.get("decoder_attention_mask")]
        for mask in candidates:
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-1] == shape[1]:
                mask = mask.reshape(-1, shape[1])
                if mask.shape[0] == shape[0]:
                    found = mask
                    break
        masks.append(found)
    return masks


def unlabelled_rows(labels) -> torch.Tensor | None:
    """Rows (first dimension) whose every label is -100, or None when there are none."""
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] == 0:
        return None
    missing = (labels == IGNORE_INDEX).reshape(labels.shape[0], -1).all(-1)
    return missing if bool(missing.any()) else None
