"""Data in: evaluation batches from a data loader, a tokenized data set or raw text, and the examples of a file."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..losses import MULTI_LABEL, SINGLE_LABEL
from .core import LABEL_KEYS


def _labels_to_multi_hot(value, num_labels: int) -> list[float]:
    if isinstance(value, str):
        ids = [int(x) for x in value.replace(" ", "").split(",") if x]
    elif isinstance(value, int | float):
        ids = [int(value)]
    else:
        value = list(value)
        if len(value) == num_labels and all(v in (0, 1) for v in value):
            return [float(v) for v in value]
        ids = [int(v) for v in value]
    hot = [0.0] * num_labels
    for i in ids:
        hot[i] = 1.0
    return hot


def build_dataloader(
    data,
    tokenizer=None,
    *,
    problem_type: str = SINGLE_LABEL,
    num_labels: int = 2,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    batch_size: int = 32,
) -> torch.utils.data.DataLoader | Iterable[dict[str, Any]]:
    """Batches for the evaluator from a data loader (returned as is), a tokenized data set (`input_ids`) or a data
    set of raw text (tokenized here). Examples are batched by length, to pad as little as possible."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    columns = getattr(data, "column_names", None) or list(data[0].keys())
    label_key = next((k for k in (label_column, *LABEL_KEYS) if k in columns), None)
    if label_key is None:
        raise ValueError(f"No label column {label_column!r} in the data set (columns: {columns}).")
    features = []
    if "input_ids" in columns:
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in columns]
        for row in data:
            features.append({**{k: row[k] for k in keep}, "labels": row[label_key]})
    else:
        if tokenizer is None:
            raise ValueError("The data set holds raw text: pass the tokenizer.")
        rows = list(data)
        texts = [row[text_column] for row in rows]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        for i, row in enumerate(rows):
            features.append({k: encoded[k][i] for k in encoded.keys()} | {"labels": row[label_key]})
    for feature in features:
        if problem_type == MULTI_LABEL:
            feature["labels"] = _labels_to_multi_hot(feature["labels"], num_labels)
        else:
            feature["labels"] = int(feature["labels"])
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
    text_column: str = "text",
    column_names: Sequence[str] | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    clean_br_tags: bool = True,
) -> list[dict[str, Any]]:
    """The examples of a `.csv`/`.tsv`/`.json`/`.jsonl` file (optionally `.gz`) or a `save_to_disk` folder, as
    dicts; `num_examples` of them sampled with `seed` when set. `column_names` names the columns of a file without a
    header row; `clean_br_tags` replaces IMDB's HTML line breaks in `text_column` by spaces, as the recipes do."""
    import pandas as pd

    path = Path(dataset)
    if path.is_dir():
        from datasets import load_from_disk

        frame = load_from_disk(str(path)).to_pandas()
    else:
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = suffixes[-1] if suffixes else ".csv"
        header = {"header": None, "names": list(column_names)} if column_names else {}
        if kind in (".tsv", ".txt"):
            frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, **header)
        elif kind == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif kind == ".json":
            frame = pd.read_json(path)
        else:
            frame = pd.read_csv(path, keep_default_na=False, **header)
    if num_examples is not None and num_examples < len(frame):
        frame = frame.sample(n=num_examples, random_state=seed)
    rows = frame.to_dict("records")
    if clean_br_tags:
        for row in rows:
            row[text_column] = re.sub(r"(\s*<br\s*/?>\s*)+", " ", str(row[text_column]), flags=re.IGNORECASE)
    return rows
