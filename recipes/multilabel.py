"""Fine-tune a multi-label text classifier (sigmoid outputs, BCE loss) with `AdversarialTrainer`; default GoEmotions.

Each example has any number of labels, so the model has one sigmoid per label: labels become multi-hot float
vectors and `problem_type="multi_label_classification"` makes the model's loss `BCEWithLogitsLoss`. With
`--pos_weight`, positives of rare labels weigh more. VAT (`--vat_weight`) compares the clean and perturbed per-label
Bernoulli distributions. Data, by what you have:

- nothing: GoEmotions from the Hub (`google-research-datasets/go_emotions`, config `simplified`; needs Hub access);
- local files: `--train_file` (and optionally `--validation_file`, `--test_file`) in CSV, TSV, JSON Lines or
  Parquet. Labels are a list column (`[3, 17]`, `["joy", "anger"]`), a `--label_separator`-separated string
  (`3,17` or `joy,anger`), or one 0/1 column per label (`--label_columns joy,anger,...`); label ids index
  `--class_names`/`--class_names_file`. The GoEmotions TSV files (no header: text, label ids, id) load with:

    python recipes/multilabel.py recipes/configs/goemotions_none.yaml --output_dir runs/goemotions \\
        --train_file data/goemotions/train.tsv --validation_file data/goemotions/dev.tsv \\
        --test_file data/goemotions/test.tsv --column_names text,labels,id \\
        --class_names_file data/goemotions/labels.txt

Launch with `python recipes/multilabel.py ...` or `accelerate launch recipes/multilabel.py ...`. Metrics: micro and
macro F1, per-label F1 and ROC-AUC (scikit-learn). One decision threshold for all labels is tuned on validation
(the best micro-F1 over 0.05, 0.10, ..., 0.95), reported, and applied to the test set. At the end `output_dir`
holds the model and tokenizer, `all_results.json`, `predictions_test.csv`, and a summary is printed once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import (
    DataArguments,
    DataError,
    ModelArguments,
    RawSplit,
    RecipeError,
    RobustnessReportArguments,
    build_trainer,
    check_output_dir,
    check_unlabeled_flags,
    clean_texts,
    describe_method,
    describe_outputs,
    describe_robustness,
    describe_splits,
    describe_training,
    describe_unlabeled,
    finish_splits,
    format_duration,
    load_model_and_tokenizer,
    load_raw_splits,
    load_unlabeled,
    parse_arguments,
    parse_int,
    parse_list,
    print_summary,
    resolve_column,
    robustness_report,
    rows_of,
    run_recipe,
    setup_logging,
    tokenize,
    train_and_save,
)
from datasets import Dataset, Features, Sequence, Value
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from transformers import DataCollatorWithPadding, EvalPrediction, set_seed

from hf_adv import AdversarialTrainer, AdversarialTrainingArguments
from hf_adv.losses import IGNORE_INDEX
from hf_adv.robustness import data as robustness_data

logger = logging.getLogger(__name__)

# The text column as `python -m hf_adv.robustness` finds it; the label column prefers `labels` (multi-hot or ids).
TEXT_COLUMNS = robustness_data.TEXT_COLUMNS
LABEL_COLUMNS = ("labels", "label")
GOEMOTIONS = "google-research-datasets/go_emotions"
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


@dataclass
class MultiLabelDataArguments(DataArguments):
    dataset_name: str | None = field(
        default=GOEMOTIONS,
        metadata={"help": "Dataset on the Hub, read with load_dataset; ignored when --train_file is given."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": f"Configuration of the Hub dataset; default 'simplified' for {GOEMOTIONS}."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding each example's labels; default: the first of 'labels', 'label'."},
    )
    label_columns: str | None = field(
        default=None,
        metadata={"help": "Comma-separated 0/1 columns, one per label, instead of one column of label lists."},
    )
    label_separator: str = field(
        default=",", metadata={"help": "Separator of the labels in a string cell such as '3,17' or 'joy,anger'."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_name == GOEMOTIONS and self.dataset_config_name is None:
            self.dataset_config_name = "simplified"
        if self.label_columns and self.label_column_name:
            raise RecipeError("Give --label_column_name (one column of label lists) or --label_columns, not both.")


@dataclass
class LossArguments:
    pos_weight: str | None = field(
        default=None,
        metadata={
            "help": "Weight of the positive term of BCE, per label: 'auto' (negatives / positives in the training "
            "set, capped at --pos_weight_max), one number for all labels, or one comma-separated number per label."
        },
    )
    pos_weight_max: float = field(default=10.0, metadata={"help": "Cap of the 'auto' pos_weight."})


# -- labels -----------------------------------------------------------------------------------------------------------
def label_tokens(raw: RawSplit, column: str, separator: str) -> list[list[int | str]]:
    """Each row's labels as written: ints (ids) or strings (names), from a list, '[3, 17]', '3,17' or 'joy'."""
    rows = []
    for index, value in enumerate(raw.frame[column].tolist()):
        tokens = parse_list(value)
        if tokens is None:
            if isinstance(value, str):
                if value.strip().startswith("["):
                    raise DataError(
                        f"{raw.where(index)}: labels {value!r} in column {column!r} are not a readable list; "
                        'expected e.g. [3, 17] or ["joy", "anger"].'
                    )
                tokens = [token for token in value.split(separator) if token.strip()]
            elif parse_int(value) is not None:
                tokens = [value]
            else:
                raise DataError(
                    f"{raw.where(index)}: labels in column {column!r} are {value!r}; expected a list of label ids or "
                    f"names, or a string of them separated by {separator!r}."
                )
        rows.append([parse_int(token) if parse_int(token) is not None else str(token).strip() for token in tokens])
    return rows


def infer_class_names(rows: list[list[int | str]], source: str) -> list[str]:
    """Class names when none were given: ids 0..max, or the sorted names seen in training."""
    tokens = [token for row in rows for token in row]
    if not tokens:
        raise DataError(f"{source}: no example has a label; cannot tell what the labels are.")
    if all(isinstance(token, int) for token in tokens):
        logger.warning(
            f"Labels are ids and no --class_names_file was given: assuming {max(tokens) + 1} labels (0 to the "
            "largest id in training), named by their ids."
        )
        return [str(i) for i in range(max(tokens) + 1)]
    if any(isinstance(token, int) for token in tokens):
        raise DataError(f"{source}: labels mix ids and names; give --class_names_file so that ids can be checked.")
    return sorted(set(tokens))


def multi_hot(raw: RawSplit, column: str, rows: list[list[int | str]], class_names: list[str]) -> list[list[float]]:
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    targets = []
    for index, row in enumerate(rows):
        target = [0.0] * len(class_names)
        for token in row:
            if isinstance(token, int):
                if not 0 <= token < len(class_names):
                    raise DataError(
                        f"{raw.where(index)}: label id {token} in column {column!r} is outside the label set; "
                        f"expected an id from 0 to {len(class_names) - 1} ({len(class_names)} classes)."
                    )
                label_id = token
            else:
                label_id = lookup.get(token.lower())
                if label_id is None:
                    shown = class_names if len(class_names) <= 30 else class_names[:30] + ["..."]
                    raise DataError(
                        f"{raw.where(index)}: unknown label {token!r} in column {column!r}; expected one of {shown}."
                    )
            target[label_id] = 1.0
        targets.append(target)
    return targets


def indicator_columns(raw: RawSplit, columns: list[str]) -> list[list[float]]:
    """Multi-hot targets from one 0/1 column per label."""
    values = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}
    targets = np.zeros((len(raw.frame), len(columns)))
    for j, column in enumerate(columns):
        resolve_column(raw, column, (), "label", "--label_columns")
        for index, value in enumerate(raw.frame[column].tolist()):
            parsed = values.get(str(value).strip().lower())
            if parsed is None:
                raise DataError(f"{raw.where(index)}: label column {column!r} holds {value!r}; expected 0 or 1.")
            targets[index, j] = parsed
    return targets.tolist()


def resolve_pos_weight(
    spec: str | None, targets: np.ndarray, cap: float, class_names: list[str]
) -> torch.Tensor | None:
    if spec is None:
        return None
    if spec.strip().lower() == "auto":
        positives = targets.sum(0)
        weights = np.minimum((len(targets) - positives) / np.maximum(positives, 1.0), cap)
    else:
        try:
            weights = np.array([float(value) for value in spec.split(",")])
        except ValueError as error:
            raise RecipeError(
                f"--pos_weight {spec!r}: expected 'auto', a number or comma-separated numbers."
            ) from error
        if len(weights) == 1:
            weights = np.repeat(weights, len(class_names))
        if len(weights) != len(class_names) or not (weights > 0).all():
            raise RecipeError(
                f"--pos_weight {spec!r}: expected one positive number or {len(class_names)} (one per label)."
            )
    logger.info("pos_weight: " + ", ".join(f"{name} {w:.2f}" for name, w in zip(class_names, weights)))
    return torch.tensor(weights, dtype=torch.float32)


def pos_weight_loss(pos_weight: torch.Tensor):
    """A `compute_loss_func` for `Trainer`: BCE with a per-label `pos_weight`, which the model's own loss lacks.

    Summed over the (example, label) entries and divided by `num_items_in_batch` (the entries of the whole
    accumulated batch, as `Trainer` counts them), so that gradient accumulation gives the larger batch's loss; the
    mean over the micro-batch's entries when `Trainer` passes no count (evaluation).
    """

    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"].float()
        known = labels != IGNORE_INDEX
        per_entry = F.binary_cross_entropy_with_logits(
            logits, labels.float().clamp_min(0.0), pos_weight=pos_weight.to(logits.device), reduction="none"
        )
        total = (per_entry * known).sum()
        count = num_items_in_batch if num_items_in_batch is not None else known.sum().clamp_min(1)
        return total / count

    return loss


# -- metrics ----------------------------------------------------------------------------------------------------------
def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def multilabel_metrics(
    probabilities: np.ndarray, targets: np.ndarray, threshold: float, class_names: list[str] | None = None
) -> dict[str, float]:
    """Micro and macro F1 and subset accuracy at `threshold`, ROC-AUC (macro over labels that have both classes in
    `targets`, and micro); per-label F1 when `class_names` is given."""
    targets = targets.astype(int)
    predicted = (probabilities >= threshold).astype(int)
    metrics = {
        "micro_f1": f1_score(targets, predicted, average="micro", zero_division=0),
        "macro_f1": f1_score(targets, predicted, average="macro", zero_division=0),
        "exact_match": accuracy_score(targets, predicted),
        "threshold": threshold,
    }
    both = (targets.min(0) == 0) & (targets.max(0) == 1)
    if both.any():
        metrics["roc_auc_macro"] = roc_auc_score(targets[:, both], probabilities[:, both], average="macro")
        metrics["roc_auc_micro"] = roc_auc_score(targets, probabilities, average="micro")
    if class_names is not None:
        per_label = f1_score(targets, predicted, average=None, zero_division=0)
        metrics.update({f"f1_{name}": score for name, score in zip(class_names, per_label)})
    return metrics


def tune_threshold(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """The threshold in THRESHOLDS with the best micro-F1 (the lowest one on ties)."""
    scores = [f1_score(targets.astype(int), probabilities >= t, average="micro", zero_division=0) for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.argmax(scores))])


def main(argv: list[str] | None = None) -> dict[str, float]:
    started = time.perf_counter()
    model_args, data_args, loss_args, report_args, training_args = parse_arguments(
        (
            ModelArguments,
            MultiLabelDataArguments,
            LossArguments,
            RobustnessReportArguments,
            AdversarialTrainingArguments,
        ),
        argv,
    )
    setup_logging(training_args)
    logger.info(
        f"{training_args.world_size} process(es), device {training_args.device}, bf16 {training_args.bf16}, "
        f"adversarial: {describe_method(training_args)}"
    )
    checkpoint = check_output_dir(training_args)
    unlabeled_sources = check_unlabeled_flags(data_args, training_args)
    set_seed(training_args.seed)

    # -- data: read, check and encode every split before any model is loaded ------------------------------------
    with training_args.main_process_first(desc="load data"):
        raw_splits, features = load_raw_splits(data_args, model_args)
        unlabeled = load_unlabeled(data_args, raw_splits, TEXT_COLUMNS)
    label_columns = [c.strip() for c in data_args.label_columns.split(",")] if data_args.label_columns else None
    class_names = data_args.read_class_names()
    if label_columns is not None:
        if class_names is not None and len(class_names) != len(label_columns):
            raise RecipeError(f"{len(label_columns)} --label_columns but {len(class_names)} class names.")
        class_names = class_names or label_columns
    frames = {}
    for split, raw in raw_splits.items():
        text_column = resolve_column(raw, data_args.text_column_name, TEXT_COLUMNS, "text", "--text_column_name")
        frame = pd.DataFrame({"text": clean_texts(raw, text_column, data_args.clean_br_tags)}, index=raw.frame.index)
        if label_columns is not None:
            frame["labels"] = indicator_columns(raw, label_columns)
        else:
            column = resolve_column(raw, data_args.label_column_name, LABEL_COLUMNS, "label", "--label_column_name")
            rows = label_tokens(raw, column, data_args.label_separator)
            if class_names is None:
                feature = features[column] if features is not None else None
                class_names = getattr(getattr(feature, "feature", None), "names", None)
                class_names = class_names or infer_class_names(rows, raw.source)
            frame["labels"] = multi_hot(raw, column, rows, class_names)
        id_column = data_args.id_column_name or ("id" if "id" in raw.frame.columns else None)
        if id_column is not None:
            frame["id"] = raw.frame[resolve_column(raw, id_column, (), "id", "--id_column_name")]
        frames[split] = frame
    frames = finish_splits(frames, data_args)
    targets = {split: np.array(frame["labels"].tolist(), dtype=np.float32) for split, frame in frames.items()}
    for split, target in targets.items():
        logger.info(
            f"{split}: {len(target)} examples, {len(class_names)} labels, {target.sum(1).mean():.2f} labels per "
            f"example, {int((target.sum(1) == 0).sum())} without any"
        )
    if unlabeled is not None:
        logger.info(f"unlabelled: {len(unlabeled)} texts ({', '.join(unlabeled_sources)})")
    pos_weight = resolve_pos_weight(loss_args.pos_weight, targets["train"], loss_args.pos_weight_max, class_names)

    # -- model and tokenizer --------------------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(
        model_args,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        problem_type="multi_label_classification",
    )
    schema = Features({"text": Value("string"), "labels": Sequence(Value("float32"))})
    with training_args.main_process_first(desc="tokenize"):
        tokenized = {
            split: tokenize(
                Dataset.from_dict({"text": frame["text"].tolist(), "labels": targets[split].tolist()}, schema),
                tokenizer,
                data_args.max_seq_length,
            )
            for split, frame in frames.items()
        }
        unlabeled_dataset = None
        if unlabeled is not None:
            unlabeled_dataset = tokenize(
                Dataset.from_dict({"text": unlabeled["text"].tolist()}), tokenizer, data_args.max_seq_length
            )

    # Evaluation during training uses 0.5; the final test evaluation, the threshold tuned on validation.
    scoring = {"threshold": 0.5, "class_names": None}

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        return multilabel_metrics(
            sigmoid(prediction.predictions), prediction.label_ids, scoring["threshold"], scoring["class_names"]
        )

    # -- train, tune the threshold, predict, save ------------------------------------------------------------------
    trainer_kwargs = {
        "model": model,
        "args": training_args,
        "train_dataset": tokenized["train"],
        "eval_dataset": tokenized["validation"],
        "processing_class": tokenizer,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": compute_metrics,
        "unlabeled_dataset": unlabeled_dataset,
    }
    if pos_weight is not None:
        trainer_kwargs["compute_loss_func"] = pos_weight_loss(pos_weight)
    trainer = build_trainer(AdversarialTrainer, **trainer_kwargs)
    train_result, train_metrics = train_and_save(trainer, checkpoint, len(frames["train"]))

    validation = trainer.predict(tokenized["validation"], metric_key_prefix="eval")
    validation_probabilities = sigmoid(validation.predictions)
    threshold = tune_threshold(validation_probabilities, targets["validation"])
    tuned = multilabel_metrics(validation_probabilities, targets["validation"], threshold)
    eval_metrics = {
        **validation.metrics,
        **{f"eval_tuned_{name}": tuned[name] for name in ("micro_f1", "macro_f1", "exact_match")},
        "eval_samples": len(frames["validation"]),
        "decision_threshold": threshold,
    }
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    results = {**train_metrics, **eval_metrics}

    scoring.update(threshold=threshold, class_names=class_names)
    predict_split = "test" if "test" in frames else "validation"
    if predict_split == "test":
        output = trainer.predict(tokenized["test"], metric_key_prefix="test")
        probabilities = sigmoid(output.predictions)
        at_half = multilabel_metrics(probabilities, targets["test"], 0.5)
        test_metrics = {
            **output.metrics,
            "test_micro_f1_at_0.5": at_half["micro_f1"],
            "test_macro_f1_at_0.5": at_half["macro_f1"],
            "test_samples": len(frames["test"]),
        }
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        results.update(test_metrics)
    else:
        probabilities = validation_probabilities
    frame = frames[predict_split]
    predictions = pd.DataFrame({"row": rows_of(frame)})
    if "id" in frame:
        predictions["id"] = frame["id"].tolist()
    predictions["labels"] = [",".join(n for n, t in zip(class_names, row) if t) for row in targets[predict_split]]
    predictions["predicted"] = [
        ",".join(n for n, p in zip(class_names, row) if p >= threshold) for row in probabilities
    ]
    for i, name in enumerate(class_names):
        predictions[f"prob_{name}"] = probabilities[:, i].round(6)
    predictions["text"] = frame["text"].tolist()
    robustness = robustness_report(
        trainer,
        tokenized[predict_split],
        report_args,
        seed=data_args.split_seed,
        name=training_args.run_name or describe_method(training_args),
    )

    if trainer.is_world_process_zero():
        predictions.to_csv(f"{training_args.output_dir}/predictions_{predict_split}.csv", index=False)
        source = data_args.train_file or data_args.dataset_name
        lines = [
            f"model       {model_args.model_name_or_path}",
            f"data        {source}: {describe_splits(frames)}",
            f"labels      {len(class_names)}, loss BCE" + (" with pos_weight" if pos_weight is not None else ""),
        ]
        if unlabeled is not None:
            ratio = training_args.unlabeled_ratio
            lines.append(f"unlabelled  {describe_unlabeled(len(unlabeled), unlabeled_sources, ratio, train_metrics)}")
        lines += [
            f"training    {describe_training(train_result, training_args.seed)}",
            f"threshold   {threshold:g} (tuned on validation for micro-F1; 0.5 during training)",
            f"validation  micro-F1 {eval_metrics['eval_tuned_micro_f1']:.4f}, macro-F1 "
            f"{eval_metrics['eval_tuned_macro_f1']:.4f} at the tuned threshold (optimistic: tuned there)",
        ]
        if predict_split == "test":
            auc = results.get("test_roc_auc_macro")
            lines.append(
                f"test        micro-F1 {results['test_micro_f1']:.4f}, macro-F1 {results['test_macro_f1']:.4f}"
                + (f", ROC-AUC {auc:.4f}" if auc is not None else "")
                + f" (micro-F1 {results['test_micro_f1_at_0.5']:.4f} at 0.5)"
            )
        if robustness is not None:
            lines.append(f"robustness  {describe_robustness(robustness, 'micro-F1')}")
        lines += [
            f"wall time   {format_duration(time.perf_counter() - started)}",
            f"saved in    {describe_outputs(training_args.output_dir, predict_split)}",
        ]
        print_summary(f"multilabel: {describe_method(training_args)}", lines)
    return results


if __name__ == "__main__":
    run_recipe(main)
