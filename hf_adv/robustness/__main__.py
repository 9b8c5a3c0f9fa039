"""The robustness CLI: `python -m hf_adv.robustness` (or `hf-adv-robustness`); see the package docstring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cli import UsageError, exit_on_usage_error, model_load_error, model_load_kwargs, one_line, parse_cli
from .api import evaluate_robustness, load_model
from .data import LABEL_COLUMNS, TEXT_COLUMNS, load_rows
from .evaluator import ATTACKS, check_attack_settings
from .report import markdown_table, read_results, write_report

DESCRIPTION = (
    "Robustness evaluation: clean accuracy, accuracy under embedding-space attacks (FGM, PGD), the minimal "
    "adversarial perturbation and a word-substitution attack, for single-label and multi-label classifiers."
)


@dataclass
class RobustnessArguments:
    """Flags of `python -m hf_adv.robustness` (a single `.json` or `.yaml` argument is read as a config file)."""

    # -- models ---------------------------------------------------------------------------------------------------
    model_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Model folders to evaluate (from_pretrained); one line each in the plot."},
    )
    model_names: list[str] | None = field(
        default=None, metadata={"help": "Names in the table and legend, one per model path; default: folder names."}
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: each model's."})
    results: list[str] | None = field(
        default=None, metadata={"help": "JSON reports of earlier runs to add to the table and plot."}
    )
    embedding_name: str | None = field(
        default=None, metadata={"help": "Embedding weight to attack; default: model.get_input_embeddings()."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; default: cuda when available."})
    # -- data -----------------------------------------------------------------------------------------------------
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A .csv/.tsv/.jsonl/.json/.parquet file (optionally .gz, .bz2, .xz, .zip, .zst; read as the "
            "recipes read it) or a `save_to_disk` folder.",
            "aliases": ["--test_file"],
        },
    )
    text_column_name: str | None = field(
        default=None,
        metadata={
            "help": f"Column with the text; default: the first of {', '.join(TEXT_COLUMNS)} (as the recipes).",
            "aliases": ["--text_column"],
        },
    )
    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": f"Column with the label; default: the first of {', '.join(LABEL_COLUMNS)}. A class id or a class "
            "name of the model's id2label (as the recipes save it: negative, positive); for multi-label, label ids "
            "or names (a list, or comma-separated).",
            "aliases": ["--label_column"],
        },
    )
    column_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated names for the columns of a CSV/TSV file without a header row, as in the "
            "recipes: 'text,labels,id' (space-separated names work too)."
        },
    )
    num_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many examples, sampled with the seed; default: all."}
    )
    clean_br_tags: bool = field(
        default=True, metadata={"help": "Replace HTML line breaks (<br />) by spaces, as the recipes do."}
    )
    max_length: int = field(
        default=128, metadata={"help": "Truncate inputs to this many tokens.", "aliases": ["--max_seq_length"]}
    )
    batch_size: int = field(default=32, metadata={"help": "Examples per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the example sample and of torch."})
    # -- attacks --------------------------------------------------------------------------------------------------
    attacks: list[str] = field(
        default_factory=lambda: list(ATTACKS), metadata={"help": "Any of fgm, pgd, min_perturbation, word."}
    )
    epsilons: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        metadata={"help": "FGM/PGD radii: L2 norm per example of the perturbation of the input embedding output."},
    )
    pgd_steps: int = field(default=5, metadata={"help": "PGD iterates K (the first is the FGM point)."})
    pgd_step_size: float | None = field(
        default=None, metadata={"help": "PGD step after the first, as a fraction of epsilon; default 2.5 / K."}
    )
    max_epsilon: float = field(default=4.0, metadata={"help": "Upper end of the minimal-perturbation bisection."})
    bisection_steps: int = field(default=8, metadata={"help": "Halvings of [0, max_epsilon]."})
    word_budget: float = field(
        default=0.1,
        metadata={"help": "Word attack: tokens changed per example, a fraction if < 1 (at least 1), else a count."},
    )
    word_neighbours: int = field(default=20, metadata={"help": "Word attack: nearest tokens tried per position."})
    attack_loss: list[str] = field(
        default_factory=lambda: ["ce"],
        metadata={
            "help": "What the attacks maximize, one evaluation per value: ce (the model's cross-entropy, BCE for "
            "multi-label) or margin (the logit difference of Carlini and Wagner, which a saturated softmax does not "
            "hide: evaluate a distilled model with both). With several, each row is named 'model (loss attack)'."
        },
    )
    # -- output ---------------------------------------------------------------------------------------------------
    output_dir: str = field(default="robustness", metadata={"help": "Where robustness.{json,md,png} are written."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.column_names:  # the recipes' comma syntax, or space-separated names
            self.column_names = [n.strip() for value in self.column_names for n in value.split(",") if n.strip()]
        if self.model_names is not None and len(self.model_names) != len(self.model_paths):
            raise ValueError(f"{len(self.model_names)} model_names for {len(self.model_paths)} model_paths.")
        if self.model_paths and self.dataset is None:
            raise ValueError("--dataset is needed to evaluate models.")
        if not self.model_paths and not self.results:
            raise ValueError("Nothing to do: pass --model_paths (with --dataset) and/or --results.")
        check_attack_settings(
            self.attacks,
            self.epsilons,
            self.attack_loss,
            self.num_examples,
            {name: f"--{name}" for name in ("attacks", "epsilons", "attack_loss", "num_examples")},
        )

    def evaluator_kwargs(self) -> dict[str, Any]:
        return dict(
            epsilons=self.epsilons,
            attacks=self.attacks,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            max_epsilon=self.max_epsilon,
            bisection_steps=self.bisection_steps,
            word_budget=self.word_budget,
            word_neighbours=self.word_neighbours,
            embedding_name=self.embedding_name,
            seed=self.seed,
            disable_tqdm=self.disable_tqdm,
        )


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    from transformers import AutoTokenizer, HfArgumentParser

    parser = HfArgumentParser(RobustnessArguments, prog="python -m hf_adv.robustness", description=DESCRIPTION)
    # A .json/.yaml config may come first, flags after it override it; a mistake is one line (`UsageError`).
    (args,) = parse_cli(parser, argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        results = read_results(args.results or [])
    except ValueError as error:
        raise UsageError(one_line(error)) from error
    rows = []
    if args.model_paths:
        try:
            rows = load_rows(
                args.dataset,
                text_column=args.text_column_name,
                column_names=args.column_names,
                num_examples=args.num_examples,
                seed=args.seed,
                clean_br_tags=args.clean_br_tags,
            )
        except ValueError as error:
            raise UsageError(one_line(error)) from error
    names = args.model_names or [Path(p).name for p in args.model_paths]
    settings = {k: v for k, v in asdict(args).items() if k not in ("model_paths", "model_names", "results")}
    for name, path in zip(names, args.model_paths):
        # A folder, or a Hub name that is cached or reachable; else one line naming the fix (offline use).
        load = model_load_kwargs(path, "--model_paths")
        if args.tokenizer_path:
            load.update(model_load_kwargs(args.tokenizer_path, "--tokenizer_path"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or path, **load)
            model = load_model(path, device, **load)
        except OSError as error:
            raise model_load_error(path, error, "--model_paths") from error
        for attack_loss in args.attack_loss:
            row = name if len(args.attack_loss) == 1 else f"{name} ({attack_loss} attack)"
            try:
                metrics = evaluate_robustness(
                    model,
                    rows,
                    tokenizer,
                    text_column=args.text_column_name,
                    label_column=args.label_column_name,
                    max_length=args.max_length,
                    batch_size=args.batch_size,
                    description=row,
                    attack_loss=attack_loss,
                    **args.evaluator_kwargs(),
                )
            except ValueError as error:  # the data does not fit the model: its labels
                raise UsageError(f"--dataset {args.dataset}: {one_line(error)}") from error
            metrics["model"] = path
            metrics["settings"] = settings
            results[row] = metrics
        del model
    paths = write_report(results, args.output_dir)
    print(markdown_table(results))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def cli() -> None:
    """The `hf-adv-robustness` command (the same as `python -m hf_adv.robustness`): a mistake in the flags, the
    data or the model prints one line and exits with status 2."""
    exit_on_usage_error(main)


if __name__ == "__main__":
    cli()
