"""The recipes' data: `load_raw_splits` reads train/validation/test as pandas frames from a Hub dataset
(`load_dataset`), local CSV, TSV, JSON Lines or Parquet files (compressed or not; `hf_adv.robustness.read_table`, the
rules the robustness CLI shares) or an `aclImdb`-style folder tree (`train/pos/*.txt`). Every check on the data
happens here or in the recipe's label encoding, before any model is loaded, and a `DataError` names the file, the
column or the row and what was expected. `carve_validation` and `sample` draw the validation split and
`--max_*_samples` with a fixed `--split_seed`, so every training seed and every method sees the same examples; then
the model, the tokenizer and tokenization."""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from hf_adv.cli import model_load_error, model_load_kwargs
from hf_adv.robustness.data import BR_TAG, find_column, table_format
from hf_adv.robustness.data import read_table as _read_table

from .arguments import DataArguments, DataError, ModelArguments, RecipeError

logger = logging.getLogger("common")


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


def read_text_folder(folder: Path) -> RawSplit:
    """A folder of `.txt` files, one text each (as `aclImdb/train/unsup/`): the file name is the id."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DataError(f"{folder}: expected .txt files, one text each; the folder has none.")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    frame = pd.DataFrame({"id": [path.stem for path in files], "text": texts})
    return RawSplit(frame, source=str(folder), row_sources=[str(path) for path in files])


def tree_root(data_dir: str) -> Path:
    """The `aclImdb`-style tree of `--data_dir` (the folder itself, or its `aclImdb/` child)."""
    root = Path(data_dir)
    if (root / "aclImdb").is_dir():
        root = root / "aclImdb"
    if not (root / "train").is_dir():
        raise DataError(f"--data_dir {data_dir}: expected a train/ folder (and test/), as in aclImdb/.")
    return root


def column_names_of(data_args: DataArguments) -> list[str] | None:
    return [c.strip() for c in data_args.column_names.split(",")] if data_args.column_names else None


def load_raw_splits(
    data_args: DataArguments, model_args: ModelArguments, unlabeled: tuple[str, str] | None = None
) -> tuple[dict[str, RawSplit], object]:
    """The splits ('train', and 'validation'/'test' when there are) and, for a Hub dataset, its features.

    `unlabeled` = (the Hub split, the `--data_dir` folder) of a dataset's own unlabelled texts, e.g. ("unsupervised",
    "train/unsup") for IMDB: read as the split 'unlabeled' (labels, if any, are to be ignored); a `DataError` when
    the dataset has no such split."""
    splits, features = _load_raw_splits(data_args, model_args, unlabeled)
    if unlabeled is not None and "unlabeled" not in splits:
        where = data_args.train_file or getattr(data_args, "data_dir", None) or data_args.dataset_name
        raise DataError(
            f"{where} has no unlabelled split (the Hub split {unlabeled[0]!r}, or {unlabeled[1]}/ under --data_dir); "
            "give the unlabelled texts with --unlabeled_file instead."
        )
    return splits, features


def _load_raw_splits(data_args, model_args, unlabeled) -> tuple[dict[str, RawSplit], object]:
    column_names = column_names_of(data_args)
    data_dir = getattr(data_args, "data_dir", None)
    if data_args.train_file:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        return {split: read_table(path, column_names) for split, path in files.items() if path}, None
    if data_dir:
        root = tree_root(data_dir)
        splits = {"train": read_folder_split(root / "train")}
        for split, folder in (("validation", "validation"), ("validation", "dev"), ("test", "test")):
            if split not in splits and (root / folder).is_dir():
                splits[split] = read_folder_split(root / folder)
        if unlabeled is not None and (root / unlabeled[1]).is_dir():
            splits["unlabeled"] = read_text_folder(root / unlabeled[1])
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
    if unlabeled is not None and unlabeled[0] in raw:
        frame = raw[unlabeled[0]].to_pandas()
        splits["unlabeled"] = RawSplit(frame, source=f"{data_args.dataset_name} [{unlabeled[0]} split]")
    return splits, raw["train"].features


def load_unlabeled(
    data_args: DataArguments,
    raw_splits: dict[str, RawSplit],
    text_columns: tuple[str, ...],
) -> pd.DataFrame | None:
    """The unlabelled texts (a frame with a `text` column) from `--unlabeled_file` (a table, or a folder of .txt
    files), the test split's texts (`--unlabeled_from_test`), the dataset's own unlabelled split (`raw_splits`'
    'unlabeled', see `load_raw_splits`), drawn down to
    `--max_unlabeled_samples` with `--split_seed`; None when there are none. Label columns are ignored; an empty
    source, a missing text column or an empty text is a `DataError` naming it."""
    # (the split, the text column asked for, the flags that set it and the column names) for each source
    parts = []
    if "unlabeled" in raw_splits:
        parts.append((raw_splits["unlabeled"], data_args.text_column_name, ("--text_column_name", "--column_names")))
    if data_args.unlabeled_file:
        path = Path(data_args.unlabeled_file)
        if path.is_dir():
            raw = read_text_folder(path)
        elif not path.is_file():
            raise DataError(f"--unlabeled_file {path}: no such file or folder.")
        else:
            names = data_args.unlabeled_column_names
            raw = read_table(str(path), [c.strip() for c in names.split(",")] if names else None)
        # Its own column rules: the training files' text column when it has one, else the usual candidates.
        column = data_args.unlabeled_text_column_name
        if column is None and data_args.text_column_name in raw.frame.columns:
            column = data_args.text_column_name
        parts.append((raw, column, ("--unlabeled_text_column_name", "--unlabeled_column_names")))
    if data_args.unlabeled_from_test:
        if "test" not in raw_splits:
            raise DataError(
                "--unlabeled_from_test true: there is no test split to take texts from; give --test_file (or a "
                "dataset with a test split), or --unlabeled_file."
            )
        parts.append((raw_splits["test"], data_args.text_column_name, ("--text_column_name", "--column_names")))
    if not parts:
        return None
    texts = []
    for raw, requested, (flag, names_flag) in parts:
        if len(raw.frame) == 0:
            raise DataError(f"{raw.source}: no unlabelled text in it (no rows); give a file with a text column.")
        column = resolve_column(raw, requested, text_columns, "text", flag, names_flag)
        texts += clean_texts(raw, column, data_args.clean_br_tags)
    return sample(pd.DataFrame({"text": texts}), data_args.max_unlabeled_samples, data_args.split_seed)


def check_unlabeled_flags(data_args: DataArguments, training_args) -> list[str]:
    """The flags that give unlabelled text (`data_args.unlabeled_sources()`); a `RecipeError` at once when no
    configured method would learn from them (VAT off), or when `--unlabeled_ratio` or `--max_unlabeled_samples` is
    set without any."""
    sources = data_args.unlabeled_sources()
    if sources:
        try:
            training_args.check_unlabeled_data(" and ".join(sources))
        except ValueError as error:
            raise RecipeError(str(error)) from None
    else:
        flags = []
        if training_args.unlabeled_ratio != 1.0:
            flags.append(f"--unlabeled_ratio {training_args.unlabeled_ratio:g}")
        if data_args.max_unlabeled_samples is not None:
            flags.append(f"--max_unlabeled_samples {data_args.max_unlabeled_samples}")
        if flags:
            raise RecipeError(
                f"{' and '.join(flags)} {'is' if len(flags) == 1 else 'are'} read only with unlabelled text, and none "
                "is given: add --unlabeled_file or --unlabeled_from_test true"
                + (" (or --unlabeled_from_unsup true)" if hasattr(data_args, "unlabeled_from_unsup") else "")
                + "."
            )
    return sources


def resolve_column(
    raw: RawSplit,
    requested: str | None,
    candidates: tuple[str, ...],
    what: str,
    flag: str,
    names_flag: str = "--column_names",
) -> str:
    """The column to use: `requested` if given, else the first candidate present (`hf_adv.robustness.data.find_column`,
    the rule the robustness CLI reads tables with); a DataError names the columns."""
    try:
        return find_column(raw.frame.columns, requested, candidates, what, flag, raw.source, names_flag)
    except ValueError as error:
        raise DataError(str(error)) from None


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
