"""Data in: evaluation batches from a data loader, a tokenized data set or raw text, and the examples of a file."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..losses import IGNORE_INDEX, MULTI_LABEL, SINGLE_LABEL
from .core import LABEL_KEYS

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")
# IMDB's HTML line breaks, replaced by a space (the recipes' --clean_br_tags).
BR_TAG = re.compile(r"(\s*<br\s*/?>\s*)+", flags=re.IGNORECASE)
# Without --text_column_name / --label_column_name, the first of these columns present is used: the recipes and
# `python -m hf_adv.robustness` read a table the same way (Kaggle's IMDB CSV is `review,sentiment`, Jigsaw's
# `comment_text`).
TEXT_COLUMNS = ("text", "review", "sentence", "comment_text")
LABEL_COLUMNS = ("label", "labels", "sentiment")
# Class names that stand for another: the Hub's IMDB and aclImdb/ say `neg`/`pos`, Kaggle's CSV `negative`/`positive`.
CLASS_NAME_ALIASES = {"neg": "negative", "pos": "positive"}


def find_column(
    columns: Sequence[str],
    requested: str | None,
    candidates: Sequence[str],
    what: str,
    flag: str,
    source: str = "",
    names_flag: str | None = None,
) -> str:
    """The column to read: `requested` if given, else the first of `candidates` present. The recipes and the CLI
    read tables with it.

    Raises:
        `ValueError`: naming `source`, the columns there are and `flag` (and `names_flag`, the flag that names the
        columns of a file without a header row), when the column is missing.
    """
    where = f"{source}: " if source else ""
    columns = list(columns)
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"{where}no {what} column {requested!r}; the columns are {columns}. Set {flag} to one of them."
            )
        return requested
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ValueError(
            f"{where}no {what} column; looked for {list(candidates)}, the columns are {columns}. Set {flag} to the "
            f"right one" + (f" (or {names_flag} for a file without a header row)." if names_flag else ".")
        )
    return found


def _class_id(value, names: dict[str, int]) -> int:
    """A class id from an id (1, 1.0, '1'; read first, as the recipes do) or else a class name of the model's
    `id2label` (case-insensitive; `pos`/`neg` for `positive`/`negative`, as the IMDB recipe reads them)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        name = str(value).strip().lower()
        name = CLASS_NAME_ALIASES.get(name, name) if name not in names else name
        if name in names:
            return names[name]
        raise ValueError(value) from None
    if number != int(number):
        raise ValueError(value)
    return int(number)


def _labels_to_multi_hot(value, num_labels: int, names: dict[str, int]) -> list[float]:
    if isinstance(value, str) and value.strip().startswith("["):  # a list written to a CSV cell: "[0, 2]", "['joy']"
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(value) from None
    if isinstance(value, str):
        ids = [_class_id(x.strip().strip("'\""), names) for x in value.split(",") if x.strip()]
    elif isinstance(value, int | float):
        ids = [_class_id(value, names)]
    else:
        value = list(value)
        if len(value) == num_labels and all(v in (0, 1) for v in value):
            return [float(v) for v in value]
        ids = [_class_id(v, names) for v in value]
    hot = [0.0] * num_labels
    for i in ids:
        if not 0 <= i < num_labels:
            raise IndexError(i)
        hot[i] = 1.0
    return hot


def build_dataloader(
    data,
    tokenizer=None,
    *,
    problem_type: str = SINGLE_LABEL,
    num_labels: int = 2,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    id2label: dict[int, str] | None = None,
) -> torch.utils.data.DataLoader | Iterable[dict[str, Any]]:
    """Batches for the evaluator from a data loader (returned as is), a tokenized data set (`input_ids`) or a data
    set of raw text (tokenized here). Examples are batched by length, to pad as little as possible.

    `text_column` / `label_column`: default the first of `TEXT_COLUMNS` / `LABEL_COLUMNS` present, as the recipes
    read a table. Labels are class ids or, with `id2label` (the model's `config.id2label`), class names
    (case-insensitive: `positive`, `Positive`); multi-label: lists of either, comma-separated, or multi-hot vectors.

    Raises:
        `ValueError`: for a missing column or a label that is no class of the model, naming its row.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    columns = getattr(data, "column_names", None) or list(data[0].keys())
    candidates = tuple(dict.fromkeys((*LABEL_COLUMNS, *LABEL_KEYS)))
    label_key = find_column(columns, label_column, candidates, "label", "--label_column_name")
    names = {str(name).lower(): int(i) for i, name in (id2label or {}).items()}
    features = []
    if "input_ids" in columns:
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in columns]
        for row in data:
            features.append({**{k: row[k] for k in keep}, "labels": row[label_key]})
    else:
        if tokenizer is None:
            raise ValueError("The data set holds raw text: pass the tokenizer.")
        rows = list(data)
        text_column = find_column(columns, text_column, TEXT_COLUMNS, "text", "--text_column_name")
        texts = [row[text_column] for row in rows]
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"Row {index + 1}: text column {text_column!r} holds {text!r}; expected a non-empty text."
                )
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        for i, row in enumerate(rows):
            features.append({k: encoded[k][i] for k in encoded.keys()} | {"labels": row[label_key]})
    for index, feature in enumerate(features):
        value = feature["labels"]
        try:
            if problem_type == MULTI_LABEL:
                feature["labels"] = _labels_to_multi_hot(value, num_labels, names)
            else:
                feature["labels"] = _class_id(value, names)
                label = feature["labels"]
                if num_labels is not None and label != IGNORE_INDEX and not 0 <= label < num_labels:
                    raise IndexError
        except (ValueError, TypeError, IndexError, OverflowError):
            kind = "label ids or names (a list, or comma-separated)" if problem_type == MULTI_LABEL else "a class"
            known = f" or names {[str(id2label[i]) for i in sorted(id2label, key=int)]}" if id2label else ""
            raise ValueError(
                f"Row {index + 1}: label {value!r} in column {label_key!r} is not {kind} of this model's "
                f"{num_labels} labels ({problem_type}); give the labels as ids 0..{(num_labels or 1) - 1}{known}."
            ) from None
    features.sort(key=lambda f: len(f["input_ids"]))
    if tokenizer is not None:
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tokenizer)
    else:
        from transformers import default_data_collator as collate
    return torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=collate)


def load_rows(
    dataset: str | Path,
    *,
    text_column: str | None = None,
    column_names: Sequence[str] | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    clean_br_tags: bool = True,
) -> list[dict[str, Any]]:
    """The examples of a table file (`read_table`: the recipes' rules) or a `save_to_disk` folder, as dicts;
    `num_examples` of them sampled with `seed` when set. `column_names` names the columns of a CSV/TSV file without
    a header row; `clean_br_tags` replaces IMDB's HTML line breaks in `text_column` (default: the first of
    `TEXT_COLUMNS` present) by spaces, as the recipes do.

    Raises:
        `ValueError`: for a file that cannot be read (see `read_table`), or without `text_column`.
    """
    path = Path(dataset)
    if path.is_dir():
        from datasets import load_from_disk

        frame = load_from_disk(str(path)).to_pandas()
    else:
        frame = read_table(str(path), list(column_names) if column_names else None)
    names_flag = None if column_names else "--column_names"
    text_column = find_column(
        frame.columns, text_column, TEXT_COLUMNS, "text", "--text_column_name", str(dataset), names_flag
    )
    if num_examples is not None and num_examples < len(frame):
        frame = frame.sample(n=num_examples, random_state=seed)
    rows = frame.to_dict("records")
    if clean_br_tags:
        for row in rows:
            if isinstance(row[text_column], str):  # a missing text stays missing, for its error to name the row
                row[text_column] = BR_TAG.sub(" ", row[text_column])
    return rows


def table_format(path: str) -> str:
    """The format of a table file from its extension (a compression suffix is looked through).

    Raises:
        `ValueError`: for an extension that is not one of `TABLE_FORMATS`.
    """
    name = Path(path).name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
    suffix = Path(name).suffix
    if suffix not in TABLE_FORMATS:
        raise ValueError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(TABLE_FORMATS)} (optionally followed by {', '.join(COMPRESSIONS)})."
        )
    return TABLE_FORMATS[suffix]


def read_table(path: str, column_names: list[str] | None = None) -> pd.DataFrame:
    """Read one local table: CSV, TSV, JSON Lines (`.jsonl`, or `.json`, which may also hold one array of
    objects) or Parquet, optionally compressed (`COMPRESSIONS`). CSV and TSV cells are read as strings, so no value
    ('NA', '007') is reinterpreted; TSV is read without quoting (GoEmotions' quotes are text). `column_names` names
    the columns of a CSV/TSV file without a header row. The recipes and `python -m hf_adv.robustness` read files
    with it.

    Raises:
        `ValueError`: naming the file and what was expected, for a missing, empty or unreadable file.
    """
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file.")
    fmt = table_format(path)
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty: expected a {fmt.upper()} file with one example per row.")
    header = fmt in ("csv", "tsv") and column_names is None
    try:
        if fmt in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                # TSV files (GoEmotions among them) do not quote: a quote character is part of the text.
                quoting=0 if fmt == "csv" else 3,
                header=0 if header else None,
                names=column_names,
                dtype=str,
                keep_default_na=False,
            )
        elif fmt in ("jsonl", "json"):
            array = fmt == "json" and _first_character(path) == "["  # one JSON array of objects
            frame = pd.read_json(path, lines=not array, dtype=False, encoding="utf-8-sig")
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path} is empty: expected a {fmt.upper()} file with one example per row.") from error
    except Exception as error:  # pandas raises many types; all mean the file is not what its extension says
        hint = " (one JSON object per line)" if fmt in ("jsonl", "json") else ""
        raise ValueError(f"{path}: could not be read as {fmt.upper()}{hint}: {error}") from error
    if len(frame) == 0:
        raise ValueError(f"{path} has a header but no data rows: expected at least one example.")
    frame.columns = [str(column) for column in frame.columns]
    return frame.reset_index(drop=True)


def _first_character(path: str) -> str:
    """The first non-blank character of a text file, decompressed as pandas would (any of `COMPRESSIONS`)."""
    from pandas.io.common import get_handle

    with get_handle(path, "r", compression="infer", encoding="utf-8-sig") as handle:
        return handle.handle.read(4096).lstrip()[:1]
