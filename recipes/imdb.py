"""Fine-tune a text classifier on IMDB movie-review sentiment (negative/positive) with `AdversarialTrainer`.

The adversarial method is a flag (`--adv_method none|fgm|fgsm|pgd|awp`, `--vat_weight` for VAT); the configs in
`recipes/configs/imdb_*.yaml` hold settings from the literature for each. Data, by what you have:

- nothing: `stanfordnlp/imdb` from the Hub (the default `--dataset_name`; needs Hub access);
- local files: `--train_file` (and optionally `--validation_file`, `--test_file`) in CSV, TSV, JSON Lines or
  Parquet, gzipped or not. The text column is found among `text`, `review`, `sentence`, `comment_text` and the
  label column among `label`, `labels`, `sentiment` (or set `--text_column_name`/`--label_column_name`), as
  `python -m hf_adv.robustness` finds them; labels are ids (0, 1) or names (`negative`/`positive`, `neg`/`pos`, or
  your own `--class_names`). The Kaggle "IMDB Dataset of 50K Movie Reviews" CSV (`review,sentiment` columns) loads
  with `--train_file` alone;
- the original `aclImdb/` folder: `--data_dir path/to/aclImdb` (`train/pos/*.txt`, `train/neg/*.txt`, `test/...`).

Without a validation split, `--validation_split_percentage` of train is held out with `--split_seed`. `<br />` tags
are replaced by spaces. Launch with any of:

    python recipes/imdb.py recipes/configs/imdb_fgm.yaml --output_dir runs/imdb_fgm
    accelerate launch recipes/imdb.py recipes/configs/imdb_fgm.yaml --output_dir runs/imdb_fgm
    python recipes/imdb.py --model_name_or_path bert-base-uncased --adv_method pgd --output_dir runs/imdb_pgd

(a config file first, then flags that override it; or flags alone). At the end `output_dir` holds the model and
tokenizer, `all_results.json` (train, validation and test metrics), `predictions_test.csv`, and a summary is
printed once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from common import (
    DataArguments,
    DataError,
    ModelArguments,
    RawSplit,
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
    print_summary,
    resolve_column,
    robustness_report,
    rows_of,
    run_recipe,
    setup_logging,
    tokenize,
    train_and_save,
)
from datasets import Dataset
from sklearn.metrics import accuracy_score, f1_score
from transformers import DataCollatorWithPadding, EvalPrediction, set_seed

from hf_adv import AdversarialTrainer, AdversarialTrainingArguments
from hf_adv.robustness import data as robustness_data

logger = logging.getLogger(__name__)

# Read as `python -m hf_adv.robustness` reads a table: the first of these columns present, unless a flag names one.
TEXT_COLUMNS, LABEL_COLUMNS = robustness_data.TEXT_COLUMNS, robustness_data.LABEL_COLUMNS
DEFAULT_CLASS_NAMES = ["negative", "positive"]
# The Hub dataset and aclImdb/ name the classes `neg`/`pos`, Kaggle's CSV `negative`/`positive`.
ALIASES = robustness_data.CLASS_NAME_ALIASES


@dataclass
class ImdbDataArguments(DataArguments):
    dataset_name: str | None = field(
        default="stanfordnlp/imdb",
        metadata={
            "help": "Dataset on the Hub, read with load_dataset; ignored when --train_file or --data_dir is given."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "An aclImdb/ folder (or its parent): train/pos/*.txt, train/neg/*.txt, test/pos/*.txt, ..."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the label; default: the first of 'label', 'labels', 'sentiment'."},
    )
    unlabeled_from_unsup: bool = field(
        default=False,
        metadata={
            "help": "Use IMDB's 50,000 unlabelled reviews as unlabelled text for semi-supervised VAT: the Hub "
            "dataset's 'unsupervised' split, or train/unsup/ of the --data_dir tree (Miyato et al. 2017)."
        },
    )

    def unlabeled_sources(self) -> list[str]:
        return super().unlabeled_sources() + (["--unlabeled_from_unsup true"] if self.unlabeled_from_unsup else [])


def encode_labels(raw: RawSplit, column: str, class_names: list[str]) -> list[int]:
    """Label ids from ids (0, '1', 1.0) or class names (case-insensitive); anything else names its row."""
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    for alias, name in ALIASES.items():
        if name in lookup:
            lookup.setdefault(alias, lookup[name])
    expected = f"one of {class_names} or a label id 0..{len(class_names) - 1}"
    ids = []
    for index, value in enumerate(raw.frame[column].tolist()):
        label_id = parse_int(value)
        if label_id is None:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{raw.where(index)}: label column {column!r} is empty; expected {expected}.")
            label_id = lookup.get(value.strip().lower())
            if label_id is None:
                raise DataError(
                    f"{raw.where(index)}: unknown label {value!r} in column {column!r}; expected {expected} "
                    "(set --class_names for other classes)."
                )
        elif not 0 <= label_id < len(class_names):
            raise DataError(
                f"{raw.where(index)}: label id {label_id} in column {column!r} is outside the label set; "
                f"expected {expected}."
            )
        ids.append(label_id)
    return ids


def main(argv: list[str] | None = None) -> dict[str, float]:
    started = time.perf_counter()
    model_args, data_args, report_args, training_args = parse_arguments(
        (ModelArguments, ImdbDataArguments, RobustnessReportArguments, AdversarialTrainingArguments), argv
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
        unsup = ("unsupervised", "train/unsup") if data_args.unlabeled_from_unsup else None
        raw_splits, features = load_raw_splits(data_args, model_args, unlabeled=unsup)
        unlabeled = load_unlabeled(data_args, raw_splits, TEXT_COLUMNS)
        raw_splits.pop("unlabeled", None)
    train_labels = resolve_column(
        raw_splits["train"], data_args.label_column_name, LABEL_COLUMNS, "label", "--label_column_name"
    )
    hub_names = getattr(features[train_labels], "names", None) if features is not None else None
    class_names = data_args.read_class_names() or hub_names or DEFAULT_CLASS_NAMES
    frames = {}
    for split, raw in raw_splits.items():
        text_column = resolve_column(raw, data_args.text_column_name, TEXT_COLUMNS, "text", "--text_column_name")
        label_column = resolve_column(raw, data_args.label_column_name, LABEL_COLUMNS, "label", "--label_column_name")
        frame = pd.DataFrame({"text": clean_texts(raw, text_column, data_args.clean_br_tags)}, index=raw.frame.index)
        frame["label"] = encode_labels(raw, label_column, class_names)
        id_column = data_args.id_column_name or ("id" if "id" in raw.frame.columns else None)
        if id_column is not None:
            frame["id"] = raw.frame[resolve_column(raw, id_column, (), "id", "--id_column_name")]
        frames[split] = frame
    frames = finish_splits(frames, data_args)
    for split, frame in frames.items():
        counts = np.bincount(frame["label"], minlength=len(class_names))
        logger.info(f"{split}: {len(frame)} examples, " + ", ".join(f"{n} {c}" for c, n in zip(class_names, counts)))
    if unlabeled is not None:
        logger.info(f"unlabelled: {len(unlabeled)} texts ({', '.join(unlabeled_sources)})")

    # -- model and tokenizer --------------------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(
        model_args,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        finetuning_task="imdb",
    )
    with training_args.main_process_first(desc="tokenize"):
        tokenized = {
            split: tokenize(
                Dataset.from_dict({"text": frame["text"].tolist(), "labels": frame["label"].tolist()}),
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

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.asarray(prediction.predictions).argmax(-1)
        labels = prediction.label_ids
        average = "binary" if len(class_names) == 2 else "macro"
        return {"accuracy": accuracy_score(labels, predicted), "f1": f1_score(labels, predicted, average=average)}

    # -- train, evaluate, predict, save ---------------------------------------------------------------------------
    trainer = build_trainer(
        AdversarialTrainer,
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        unlabeled_dataset=unlabeled_dataset,
    )
    train_result, train_metrics = train_and_save(trainer, checkpoint, len(frames["train"]))

    eval_metrics = {**trainer.evaluate(), "eval_samples": len(frames["validation"])}
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    results = {**train_metrics, **eval_metrics}

    predict_split = "test" if "test" in frames else "validation"
    output = trainer.predict(tokenized[predict_split], metric_key_prefix=predict_split)
    if predict_split == "test":
        test_metrics = {**output.metrics, "test_samples": len(frames["test"])}
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        results.update(test_metrics)
    logits = np.asarray(output.predictions, dtype=np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    frame = frames[predict_split]
    predictions = pd.DataFrame({"row": rows_of(frame)})
    if "id" in frame:
        predictions["id"] = frame["id"].tolist()
    predictions["label"] = [class_names[i] for i in frame["label"]]
    predictions["prediction"] = [class_names[i] for i in logits.argmax(-1)]
    for i, name in enumerate(class_names):
        predictions[f"prob_{name}"] = probabilities[:, i].round(6)
    predictions["text"] = frame["text"].tolist()
    predictions_path = f"{training_args.output_dir}/predictions_{predict_split}.csv"
    robustness = robustness_report(
        trainer,
        tokenized[predict_split],
        report_args,
        seed=data_args.split_seed,
        name=training_args.run_name or describe_method(training_args),
    )

    if trainer.is_world_process_zero():
        predictions.to_csv(predictions_path, index=False)
        source = data_args.train_file or getattr(data_args, "data_dir", None) or data_args.dataset_name
        lines = [
            f"model       {model_args.model_name_or_path}",
            f"data        {source}: {describe_splits(frames)}",
        ]
        if unlabeled is not None:
            ratio = training_args.unlabeled_ratio
            lines.append(f"unlabelled  {describe_unlabeled(len(unlabeled), unlabeled_sources, ratio, train_metrics)}")
        lines += [
            f"training    {describe_training(train_result, training_args.seed)}",
            f"validation  accuracy {eval_metrics['eval_accuracy']:.4f}, f1 {eval_metrics['eval_f1']:.4f}",
        ]
        if predict_split == "test":
            lines.append(f"test        accuracy {results['test_accuracy']:.4f}, f1 {results['test_f1']:.4f}")
        if robustness is not None:
            lines.append(f"robustness  {describe_robustness(robustness)}")
        lines += [
            f"wall time   {format_duration(time.perf_counter() - started)}",
            f"saved in    {describe_outputs(training_args.output_dir, predict_split)}",
        ]
        print_summary(f"imdb: {describe_method(training_args)}", lines)
    return results


if __name__ == "__main__":
    run_recipe(main)
