"""What `recipes/imdb.py` and `recipes/multilabel.py` share, in three modules read in the order of a recipe:

- `arguments`: `ModelArguments`, `DataArguments`, `RobustnessReportArguments`, `parse_arguments`, the one-line errors
  (`RecipeError`, `DataError`), logging and the `output_dir` check;
- `data`: the splits read and checked before any model is loaded, validation and samples drawn with `--split_seed`,
  the model, the tokenizer and tokenization;
- `summary`: training and saving, the summary printed at the end, the robustness report.

Every name is importable from `common` itself, as the recipes do.
"""

from __future__ import annotations

from .arguments import (
    DataArguments,
    DataError,
    ModelArguments,
    RecipeError,
    RobustnessReportArguments,
    check_output_dir,
    parse_arguments,
    run_recipe,
    setup_logging,
)
from .data import (
    RawSplit,
    carve_validation,
    check_unlabeled_flags,
    clean_texts,
    finish_splits,
    load_model_and_tokenizer,
    load_raw_splits,
    load_unlabeled,
    parse_int,
    parse_list,
    read_folder_split,
    read_table,
    read_text_folder,
    resolve_column,
    sample,
    tokenize,
)
from .summary import (
    build_trainer,
    describe_method,
    describe_outputs,
    describe_robustness,
    describe_splits,
    describe_training,
    describe_unlabeled,
    format_duration,
    print_summary,
    robustness_report,
    rows_of,
    train_and_save,
)

__all__ = [
    "build_trainer",
    "DataArguments",
    "DataError",
    "ModelArguments",
    "RawSplit",
    "RecipeError",
    "RobustnessReportArguments",
    "carve_validation",
    "check_unlabeled_flags",
    "check_output_dir",
    "clean_texts",
    "describe_method",
    "describe_outputs",
    "describe_robustness",
    "describe_splits",
    "describe_training",
    "describe_unlabeled",
    "finish_splits",
    "format_duration",
    "load_model_and_tokenizer",
    "load_raw_splits",
    "load_unlabeled",
    "parse_arguments",
    "parse_int",
    "parse_list",
    "print_summary",
    "read_folder_split",
    "read_table",
    "read_text_folder",
    "resolve_column",
    "robustness_report",
    "rows_of",
    "run_recipe",
    "sample",
    "setup_logging",
    "tokenize",
    "train_and_save",
]
