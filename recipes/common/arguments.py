"""The recipes' arguments: `ModelArguments`, `DataArguments`, `RobustnessReportArguments`, and `parse_arguments`
(`--flags`, a `.yaml`/`.json` config file, or a config file followed by `--flags` that override it); the errors the
recipes print as one line (`RecipeError`, `DataError`); logging and the `output_dir` check (an `output_dir` holding
checkpoints is resumed with `--resume_from_checkpoint` or refused, any other non-empty one is refused)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from hf_adv.cli import UsageError, exit_on_usage_error, parse_cli


class RecipeError(UsageError):
    """A problem with what the user gave (arguments, data, output_dir), found before training; the recipes print
    its message without a traceback (`run_recipe`)."""


class DataError(RecipeError):
    """Bad input data: the message names the file, column or row and what was expected."""


# -- arguments --------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A checkpoint on the Hub or a local folder, loaded with AutoModelForSequenceClassification."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to load, if not the one of model_name_or_path."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache models and datasets from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token, for private models or datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models that run their own code from the Hub."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a checkpoint's classifier head whose number of labels differs from this task's."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset on the Hub, read with load_dataset; ignored when --train_file is given."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training data: .csv, .tsv, .jsonl/.json (JSON Lines) or .parquet, optionally .gz."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Local validation data; when absent, a validation split is carved from train."},
    )
    test_file: str | None = field(default=None, metadata={"help": "Local test data, predicted at the end."})
    column_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated names for the columns of CSV/TSV files that have no header row (the first row "
            "is then data), e.g. 'text,labels,id' for the GoEmotions TSV files."
        },
    )
    text_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the text; default: the first of 'text', 'review', 'sentence', 'comment_text' "
            "(as `python -m hf_adv.robustness` reads a table)."
        },
    )
    id_column_name: str | None = field(
        default=None, metadata={"help": "Column copied into the predictions file; default: 'id' when present."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated class names, in label-id order (label id i is the i-th name)."},
    )
    class_names_file: str | None = field(
        default=None, metadata={"help": "File with one class name per line, in label-id order (e.g. labels.txt)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Texts are truncated to this many tokens."})
    clean_br_tags: bool = field(default=True, metadata={"help": "Replace HTML line breaks (<br />) by spaces."})
    validation_split_percentage: float = field(
        default=10.0,
        metadata={"help": "Percentage of train held out for validation when there is no validation split."},
    )
    split_seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the validation carve and of the --max_*_samples draws; independent of --seed, so that "
            "runs with different training seeds or methods see the same examples."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many examples, drawn with --split_seed."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validate on this many examples, drawn with --split_seed."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Predict this many test examples, drawn with --split_seed."}
    )

    # -- unlabelled text (semi-supervised VAT) --------------------------------------------------------------------
    unlabeled_file: str | None = field(
        default=None,
        metadata={
            "help": "Unlabelled text for semi-supervised VAT (needs --vat_weight > 0): a CSV, TSV, JSON Lines or "
            "Parquet file with a text column (found as for the training data; any label column is ignored), or a "
            "folder of .txt files, one text each (e.g. aclImdb/train/unsup). Unlabelled rows get only the VAT term; "
            "--unlabeled_ratio sets how many each batch carries per labelled row."
        },
    )
    unlabeled_from_test: bool = field(
        default=False,
        metadata={
            "help": "Use the test split's texts, without their labels, as unlabelled text (transductive learning, "
            "as competitors do with a competition's test set: the model sees the texts it is scored on, never their "
            "labels). Combines with --unlabeled_file."
        },
    )
    max_unlabeled_samples: int | None = field(
        default=None, metadata={"help": "Use this many unlabelled texts, drawn with --split_seed."}
    )
    unlabeled_text_column_name: str | None = field(
        default=None,
        metadata={
            "help": "The text column of --unlabeled_file; default: --text_column_name when the file has it, else the "
            "first of the recipe's text columns (text, review, ...)."
        },
    )
    unlabeled_column_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated column names for an --unlabeled_file in CSV/TSV without a header row (the "
            "training files' --column_names do not apply to it)."
        },
    )

    def unlabeled_sources(self) -> list[str]:
        """The flags that give unlabelled text, as the user wrote them (empty: none)."""
        sources = []
        if self.unlabeled_file:
            sources.append(f"--unlabeled_file {self.unlabeled_file}")
        if self.unlabeled_from_test:
            sources.append("--unlabeled_from_test true")
        return sources

    def __post_init__(self):
        if self.validation_file and not self.train_file:
            raise RecipeError("--validation_file needs --train_file as well.")
        if self.test_file and not self.train_file:
            raise RecipeError("--test_file needs --train_file as well.")
        if not 0 < self.validation_split_percentage < 100:
            raise RecipeError(
                f"--validation_split_percentage must be between 0 and 100, got {self.validation_split_percentage}."
            )
        if self.class_names and self.class_names_file:
            raise RecipeError("Give --class_names or --class_names_file, not both.")
        if self.max_seq_length < 1:
            raise RecipeError(f"--max_seq_length must be >= 1, got {self.max_seq_length}.")
        if self.unlabeled_file is not None and not self.unlabeled_file.strip():
            raise RecipeError("--unlabeled_file is empty: give the path of a file or folder of unlabelled texts.")
        if (self.unlabeled_text_column_name or self.unlabeled_column_names) and not self.unlabeled_file:
            raise RecipeError(
                "--unlabeled_text_column_name and --unlabeled_column_names describe --unlabeled_file, which is not "
                "given (the test split's texts are read with the training files' rules)."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples", "max_unlabeled_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"--{name} must be >= 1, got {value}.")

    def read_class_names(self) -> list[str] | None:
        if self.class_names:
            return [name.strip() for name in self.class_names.split(",") if name.strip()]
        if self.class_names_file:
            path = Path(self.class_names_file)
            if not path.is_file():
                raise DataError(f"--class_names_file {path}: no such file.")
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not names:
                raise DataError(f"{path} is empty: expected one class name per line.")
            return names
        return None


def parse_arguments(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `--flags` into the dataclasses. A first argument ending in .yaml, .yml or .json is a config file whose
    keys are the flags without `--`; flags after it override it. A misspelt flag or key, a refused value or a missing
    flag raises a one-line `UsageError` (`hf_adv.cli.parse_cli`)."""
    return parse_cli(HfArgumentParser(dataclass_types), argv)


def run_recipe(main) -> None:
    """Run a recipe's `main()` as a script: a mistake in what the user gave is printed as one line, `error: ...`,
    without a traceback; exit status 2 for the command line (a flag, a config key, a value, the model to load) and
    1 for the data or the output_dir."""

    def guarded():
        try:
            return main()
        except RecipeError as error:
            raise SystemExit(f"error: {error}") from None

    exit_on_usage_error(guarded)


def setup_logging(training_args) -> None:
    """Log at INFO on the main process and at `log_level_replica` (warning) on the others."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = logging.INFO if training_args.should_log else training_args.get_process_log_level()
    for name in ("__main__", __name__):
        logging.getLogger(name).setLevel(log_level)
    transformers_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(transformers_level)
    transformers.utils.logging.set_verbosity(transformers_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # Tokenizing in-memory frames is quick: the bars would only repeat the log.
    datasets.disable_progress_bars()


# -- output_dir -------------------------------------------------------------------------------------------------------
def check_output_dir(training_args) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; raises rather than overwrite anything.

    - no `output_dir`, or an empty one: a fresh run;
    - `--resume_from_checkpoint PATH`: resume from PATH;
    - `--resume_from_checkpoint true` (or `last`): resume from the last `checkpoint-*` in `output_dir`;
    - checkpoints but no `--resume_from_checkpoint`, or other files in `output_dir`: refused.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() not in ("true", "last"):
        if not Path(resume).is_dir():
            raise RecipeError(f"--resume_from_checkpoint {resume}: no such checkpoint folder.")
        return resume
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume is not None:
        if last is None:
            raise RecipeError(
                f"--resume_from_checkpoint {resume}: there is no checkpoint-* folder in {output_dir} to resume from."
            )
        return last
    if last is not None:
        raise RecipeError(
            f"output_dir {output_dir} already holds checkpoints (last: {Path(last).name}). Resume that run with "
            "--resume_from_checkpoint true, or choose a new --output_dir; nothing was overwritten."
        )
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise RecipeError(
            f"output_dir {output_dir} exists and is not empty; choose a new --output_dir, nothing was overwritten."
        )
    return None


# -- robustness report ------------------------------------------------------------------------------------------------
@dataclass
class RobustnessReportArguments:
    robustness_report: bool = field(
        default=False,
        metadata={
            "help": "After training, run the full robustness evaluation (hf_adv.robustness: FGM/PGD accuracy at "
            "--robustness_epsilons, minimal perturbation, word-substitution attack) on the test split (validation "
            "if there is none) and write robustness.{json,md,png} to output_dir. Runs on the main process only."
        },
    )
    robustness_epsilons: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        metadata={"help": "L2 radii per example on the embedding output for the FGM and PGD attacks."},
    )
    robustness_max_samples: int | None = field(
        default=1000, metadata={"help": "Examples attacked, sampled with --split_seed; all of them if unset."}
    )
    robustness_attacks: list[str] = field(
        default_factory=lambda: ["fgm", "pgd", "min_perturbation", "word"],
        metadata={
            "help": "Attacks of the report, any of fgm, pgd, min_perturbation, word (the minimal perturbation and "
            "the word attack cost about 2x and 0.6x what fgm and pgd together cost: docs/robustness/README.md)."
        },
    )

    robustness_attack_loss: list[str] = field(
        default_factory=lambda: ["ce"],
        metadata={
            "help": "What the report's attacks maximize, one evaluation per value: ce (the model's loss) or margin "
            "(the logit difference, which defensive distillation's saturated softmax does not hide). With both, "
            "each is a row of robustness.md, named 'name (loss attack)'."
        },
    )

    def __post_init__(self):
        from hf_adv.robustness.evaluator import check_attack_settings

        flags = {name: f"--robustness_{name}" for name in ("attacks", "epsilons", "attack_loss")}
        try:
            check_attack_settings(
                self.robustness_attacks,
                self.robustness_epsilons,
                self.robustness_attack_loss,
                self.robustness_max_samples,
                {**flags, "num_examples": "--robustness_max_samples"},
            )
        except ValueError as error:
            raise RecipeError(str(error)) from None
