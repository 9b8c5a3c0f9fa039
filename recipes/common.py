"""What `recipes/imdb.py` and `recipes/multilabel.py` share.

- `ModelArguments` and `DataArguments`, and `parse_arguments`: `--flags`, a `.yaml`/`.json` config file, or a
  config file followed by `--flags` that override it.
- `load_raw_splits`: train/validation/test as pandas frames, from a Hub dataset (`load_dataset`), local CSV, TSV,
  JSON Lines or Parquet files (compressed or not), or an `aclImdb`-style folder tree (`train/pos/*.txt`).
  Every check on the data happens here or in the recipe's label encoding, before any model is loaded, and a
  `DataError` names the file, the column or the row and what was expected.
- `carve_validation` and `sample`: validation split and `--max_*_samples` drawn with a fixed `--split_seed`, so
  every training seed and every method sees the same examples.
- `check_output_dir`: an `output_dir` holding checkpoints is resumed (`--resume_from_checkpoint`) or refused, any
  other non-empty one is refused: nothing a user already has is overwritten.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from hf_adv.cli import UsageError, exit_on_usage_error, model_load_error, model_load_kwargs, parse_cli
from hf_adv.robustness.data import BR_TAG, table_format
from hf_adv.robustness.data import read_table as _read_table

logger = logging.getLogger(__name__)

# Local formats, by file extension (after any compression suffix).


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
        default=None, metadata={"help": "Column holding the text; default: the first of 'text', 'review', 'sentence'."}
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
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
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


# -- reading data -----------------------------------------------------------------------------------------------------
@dataclass
class RawSplit:
    """One split as read, before any label encoding: the frame and where it came from, for error messages."""

    frame: pd.DataFrame
    source: str
    header: bool = False
    row_sources: list[str] | None = None  # one file per row, for folder layouts

    def where(self, index: int) -> str:
        """Where row `index` (0-based, in the frame as read) is, in words a user can look up."""
        if self.row_sources is not None:
            return self.row_sources[index]
        suffix = " (not counting the header)" if self.header else ""
        return f"{self.source}, row {index + 1}{suffix}"


def read_table(path: str, column_names: list[str] | None = None) -> RawSplit:
    """Read one local file with the rules the robustness CLI shares (`hf_adv.robustness.read_table`)."""
    try:
        frame = _read_table(path, column_names)
    except ValueError as error:
        raise DataError(str(error)) from error
    header = table_format(path) in ("csv", "tsv") and column_names is None
    return RawSplit(frame, source=path, header=header)


def read_folder_split(split_dir: Path, skip: tuple[str, ...] = ("unsup",)) -> RawSplit:
    """An `aclImdb`-style split: one subfolder per class (`pos/`, `neg/`), one `.txt` file per example; the folder
    name is the label and the file name (`123_8.txt`: review 123, 8 stars) the id."""
    texts, labels, ids, sources = [], [], [], []
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and d.name not in skip)
    if not class_dirs:
        raise DataError(f"{split_dir}: expected one subfolder of .txt files per class (e.g. pos/, neg/), found none.")
    for class_dir in class_dirs:
        files = sorted(class_dir.glob("*.txt"))
        if not files:
            raise DataError(f"{class_dir}: expected .txt files, one example each; the folder has none.")
        for path in files:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(class_dir.name)
            ids.append(path.stem)
            sources.append(str(path))
    frame = pd.DataFrame({"id": ids, "text": texts, "label": labels})
    return RawSplit(frame, source=str(split_dir), row_sources=sources)


def load_raw_splits(data_args: DataArguments, model_args: ModelArguments) -> tuple[dict[str, RawSplit], object]:
    """The splits ('train', and 'validation'/'test' when there are) and, for a Hub dataset, its features."""
    column_names = [c.strip() for c in data_args.column_names.split(",")] if data_args.column_names else None
    data_dir = getattr(data_args, "data_dir", None)
    if data_args.train_file:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        return {split: read_table(path, column_names) for split, path in files.items() if path}, None
    if data_dir:
        root = Path(data_dir)
        if (root / "aclImdb").is_dir():
            root = root / "aclImdb"
        if not (root / "train").is_dir():
            raise DataError(f"--data_dir {data_dir}: expected a train/ folder (and test/), as in aclImdb/.")
        splits = {"train": read_folder_split(root / "train")}
        for split, folder in (("validation", "validation"), ("validation", "dev"), ("test", "test")):
            if split not in splits and (root / folder).is_dir():
                splits[split] = read_folder_split(root / folder)
        return splits, None
    if not data_args.dataset_name:
        raise RecipeError("Give --dataset_name, --train_file or --data_dir: there is no data to train on.")
    try:
        raw = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    except ConnectionError as error:
        raise RecipeError(
            f"Could not load {data_args.dataset_name} from the Hub ({error}). Without Hub access, give local data: "
            "--train_file (CSV, TSV, JSON Lines, Parquet)"
            + (" or --data_dir" if hasattr(data_args, "data_dir") else "")
        ) from error
    if "train" not in raw:
        raise DataError(f"{data_args.dataset_name} has no 'train' split; its splits are {list(raw)}.")
    splits = {}
    for split, names in (("train", ("train",)), ("validation", ("validation", "dev")), ("test", ("test",))):
        name = next((n for n in names if n in raw), None)
        if name is not None:
            splits[split] = RawSplit(raw[name].to_pandas(), source=f"{data_args.dataset_name} [{name} split]")
    return splits, raw["train"].features


def resolve_column(raw: RawSplit, requested: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    """The column to use: `requested` if given, else the first candidate present; a DataError names the columns."""
    columns = list(raw.frame.columns)
    if requested is not None:
        if requested not in columns:
            raise DataError(
                f"{raw.source}: no {what} column {requested!r}; the columns are {columns}. Set {flag} to one of them."
            )
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise DataError(
        f"{raw.source}: no {what} column; looked for {list(candidates)}, the columns are {columns}. "
        f"Set {flag} to the right one (or --column_names for a file without a header row)."
    )


def clean_texts(raw: RawSplit, column: str, clean_br_tags: bool) -> list[str]:
    """The texts of a split; a missing or empty text is an error naming its row."""
    texts = []
    for index, value in enumerate(raw.frame[column].tolist()):
        if not isinstance(value, str) or not value.strip():
            shown = "missing" if value is None or (isinstance(value, float) and pd.isna(value)) else repr(value)
            raise DataError(f"{raw.where(index)}: text column {column!r} is {shown}; expected a non-empty text.")
        texts.append(BR_TAG.sub(" ", value) if clean_br_tags else value)
    return texts


def parse_int(value) -> int | None:
    """`value` as an integer label id if it is one (3, 3.0, '3'), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def parse_list(value) -> list | None:
    """A cell that holds a list, as a list: a real list/array, '[3, 17]', '["joy", "anger"]'; else None."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1):
        return list(value.tolist() if hasattr(value, "tolist") else value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return None
        return list(parsed) if isinstance(parsed, (list, tuple)) else None
    return None


# -- splits and samples -----------------------------------------------------------------------------------------------
def carve_validation(frame: pd.DataFrame, percentage: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation), validation being `percentage`% of the rows drawn with `seed`."""
    size = max(1, round(len(frame) * percentage / 100))
    if size >= len(frame):
        raise DataError(
            f"The training data has {len(frame)} rows: too few to hold out {percentage}% for validation. "
            "Give --validation_file or more training rows."
        )
    validation = frame.sample(n=size, random_state=seed)
    return frame.drop(index=validation.index), validation


def sample(frame: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """`max_samples` rows drawn with `seed` (the rows of sorted files are not a sample), or all rows in order."""
    if max_samples is None or max_samples >= len(frame):
        return frame
    return frame.sample(n=max_samples, random_state=seed)


def finish_splits(frames: dict[str, pd.DataFrame], data_args: DataArguments) -> dict[str, pd.DataFrame]:
    """Carve validation from train when there is none, then apply --max_train/eval/predict_samples."""
    if "validation" not in frames:
        frames["train"], frames["validation"] = carve_validation(
            frames["train"], data_args.validation_split_percentage, data_args.split_seed
        )
        logger.info(
            f"Held out {len(frames['validation'])} training rows for validation (seed {data_args.split_seed})."
        )
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    return {split: sample(frame, limits[split], data_args.split_seed) for split, frame in frames.items()}


def load_model_and_tokenizer(model_args: ModelArguments, **config_kwargs):
    """(model, tokenizer): AutoModelForSequenceClassification with `config_kwargs` (labels, problem type) set.

    A model that cannot be loaded here (offline, not in the Hub cache, no such folder) is refused at once with a
    one-line `UsageError` naming the fix (`hf_adv.cli.model_load_kwargs`), and so is a failed load."""
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    remote = {"trust_remote_code": model_args.trust_remote_code}
    sources = {"--model_name_or_path": model_args.model_name_or_path}
    if model_args.tokenizer_name:
        sources["--tokenizer_name"] = model_args.tokenizer_name
    for flag, name in sources.items():
        hub.update(model_load_kwargs(name, flag, cache_dir=model_args.cache_dir, revision=model_args.model_revision))
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs, **remote, **hub)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **remote,
            **hub,
        )
    except OSError as error:
        raise model_load_error(model_args.model_name_or_path, error) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_args.model_name_or_path, **remote, **hub
        )
    except OSError as error:
        flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
        raise model_load_error(model_args.tokenizer_name or model_args.model_name_or_path, error, flag) from error
    return model, tokenizer


def tokenize(dataset: datasets.Dataset, tokenizer, max_seq_length: int) -> datasets.Dataset:
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_seq_length)

    return dataset.map(encode, batched=True, remove_columns=["text"])


# -- reporting --------------------------------------------------------------------------------------------------------
def train_and_save(trainer, checkpoint: str | None, train_samples: int) -> tuple:
    """Train (resuming from `checkpoint` if given), save the model and tokenizer (main process only), and log and save
    the training metrics and the trainer state; returns the `TrainOutput` and the metrics."""
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    train_metrics = {**train_result.metrics, "train_samples": train_samples}
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    return train_result, train_metrics


def describe_splits(frames: dict[str, pd.DataFrame]) -> str:
    return ", ".join(f"{split} {len(frames[split])}" for split in ("train", "validation", "test") if split in frames)


def describe_training(train_result, seed: int) -> str:
    metrics = train_result.metrics
    return (
        f"{train_result.global_step} steps, {metrics.get('epoch', 0):.2f} epochs, seed {seed}, "
        f"{format_duration(metrics['train_runtime'])}"
    )


def describe_outputs(output_dir: str, predict_split: str) -> str:
    return f"{output_dir}: model, tokenizer, all_results.json, predictions_{predict_split}.csv"


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def print_summary(title: str, lines: list[str]) -> None:
    """Print once: the caller runs it on the main process only."""
    width = max(len(title), *(len(line) for line in lines)) + 4
    print("\n" + f" {title} ".center(width, "="))
    for line in lines:
        print(f"  {line}")
    print("=" * width, flush=True)


def describe_method(training_args) -> str:
    """The adversarial set-up in one phrase, for the summary."""
    args = training_args
    parts = [described for _, described in args.configured_methods()]
    start = args.resolved_start_epoch
    if parts and (start > 0 or args.adv_start_step > 0):
        parts.append(f"from epoch {start:g}" + (f" and step {args.adv_start_step}" if args.adv_start_step else ""))
    if getattr(args, "distill_teacher", None):
        hard = f", hard-label weight {args.distill_hard_weight:g}" if args.distill_hard_weight else ""
        parts.append(f"distillation from {args.distill_teacher} (temperature {args.distill_temperature:g}{hard})")
    return " + ".join(parts) if parts else "none (plain fine-tuning)"


def rows_of(frame: pd.DataFrame) -> list[int]:
    """1-based row numbers of the examples in the source, carried through sampling to the predictions file."""
    return [int(index) + 1 for index in frame.index]


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
        from hf_adv.robustness import ATTACK_LOSSES, ATTACKS

        if not self.robustness_attack_loss or set(self.robustness_attack_loss) - set(ATTACK_LOSSES):
            raise RecipeError(
                f"--robustness_attack_loss: {self.robustness_attack_loss} must be values of {list(ATTACK_LOSSES)}."
            )

        if any(not epsilon > 0 for epsilon in self.robustness_epsilons):
            raise RecipeError(f"--robustness_epsilons must all be > 0, got {self.robustness_epsilons}.")
        unknown = [a for a in self.robustness_attacks if a not in ATTACKS]
        if unknown or not self.robustness_attacks:
            raise RecipeError(
                f"--robustness_attacks: unknown or no attacks {unknown}; valid names are {list(ATTACKS)}."
            )
        if self.robustness_max_samples is not None and self.robustness_max_samples < 1:
            raise RecipeError(f"--robustness_max_samples must be >= 1, got {self.robustness_max_samples}.")


def robustness_report(trainer, dataset, args: RobustnessReportArguments, *, seed: int, name: str) -> dict | None:
    """The robustness evaluation of the trained model on `dataset`, the tokenized split the trainer predicted (main
    process only): `robustness_max_samples` of its rows drawn with `seed`, attacked as tokenized (multi-hot targets
    stay multi-hot). Returns the metrics of the first attack loss and writes `robustness.{json,md,png}` beside the
    model, so that several runs' reports can be merged with
    `python -m hf_adv.robustness --results run1/robustness.json run2/robustness.json --output_dir ...`."""
    if not args.robustness_report or not trainer.is_world_process_zero():
        return None
    from hf_adv.robustness import evaluate_robustness, write_report

    if args.robustness_max_samples is not None and args.robustness_max_samples < len(dataset):
        # The rows `DataFrame.sample(n, random_state=seed)` draws.
        rows = np.random.RandomState(seed).choice(len(dataset), size=args.robustness_max_samples, replace=False)
        dataset = dataset.select(rows.tolist())
    results = {}
    for attack_loss in args.robustness_attack_loss:
        row = name if len(args.robustness_attack_loss) == 1 else f"{name} ({attack_loss} attack)"
        results[row] = evaluate_robustness(
            trainer.model,
            dataset,
            trainer.processing_class,
            batch_size=trainer.args.per_device_eval_batch_size,
            epsilons=args.robustness_epsilons,
            attacks=args.robustness_attacks,
            attack_loss=attack_loss,
            embedding_name=trainer.args.adv_embedding_name,
            seed=seed,
            disable_tqdm=trainer.args.disable_tqdm,
            description=f"robustness of {row}",
        )
    write_report(results, trainer.args.output_dir)
    return next(iter(results.values()))


def describe_robustness(metrics: dict, metric: str = "accuracy") -> str:
    """The robustness report in one line, for the summary."""
    parts = [f"clean {metric} {metrics['clean_accuracy']:.4f}"]
    pgd = [f"{key.split('@')[1]}: {value:.4f}" for key, value in metrics.items() if key.startswith("pgd_accuracy@")]
    if pgd:
        parts.append("under PGD at eps " + ", ".join(pgd))
    if "min_perturbation_mean" in metrics:
        parts.append(f"mean minimal perturbation {metrics['min_perturbation_mean']:.3f}")
    if "word_attack_success_rate" in metrics:
        parts.append(f"word attack success {metrics['word_attack_success_rate']:.1%}")
    return "; ".join(parts) + " (robustness.md)"
