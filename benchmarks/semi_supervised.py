"""Semi-supervised VAT: what unlabelled text buys when labels are few (Miyato et al., ICLR 2017).

For every task x number of labelled rows x condition x seed, train with the recipe (`recipes/imdb.py` or
`recipes/multilabel.py`, in a subprocess, as a user runs it) and read its test score on one sample of test rows shared
by all runs. The conditions:

- `plain`: plain fine-tuning on the labelled rows;
- `vat`: VAT on the labelled rows only;
- `vat_unlabeled`: VAT on the labelled rows plus `--unlabeled` other training rows with their labels dropped
  (`--unlabeled_file`, `--unlabeled_ratio` unlabelled rows per labelled row in each batch);
- `vat_test`: the same with the unlabelled rows taken from the test split's texts (`--unlabeled_from_test`:
  transductive, the model sees the texts it is scored on, never their labels).

Every run of a task takes the same number of optimizer steps, whatever its number of labelled rows: `--steps` labelled
batches of 16 (IMDB 125, so 200 reviews are 10 epochs and 2,000 one; GoEmotions 500, so 1,000 comments are 8 epochs:
in 125 steps its 28 sigmoid outputs learn next to nothing, micro-F1 23 and macro ROC-AUC 0.60 on seed 0). VAT's
settings are `recipes/configs/imdb_vat.yaml`'s.
The rows are drawn once with a fixed seed (42): the labelled rows of a smaller set are among those of a larger one,
the validation rows (`--validation-samples`, 500; GoEmotions uses its dev split) and the unlabelled pool are disjoint
from all of them, and the scored test rows (the
recipe's `--max_predict_samples` of the test file, drawn with `--split_seed`) are the same in every run; the test
file holds 5,000 test rows for IMDB (the `vat_test` pool) and the whole test split for GoEmotions.

Runs resume as in `benchmarks.quality`: a finished run (its `all_results.json` and `semi_supervised_train.json`, the
command that trained it) is not trained again, and is refused if this invocation would train it otherwise.

    python -m benchmarks.semi_supervised --tasks imdb --labels 200 --seeds 0,1,2            # the issue's grid
    python -m benchmarks.semi_supervised --tasks imdb --labels 200,1000,2000 --conditions plain,vat_unlabeled
    python -m benchmarks.semi_supervised --tasks goemotions --seeds 0,1,2                    # 1,000 labels
    python -m benchmarks.semi_supervised --no-train --tasks imdb,goemotions                  # publish what ran
    python -m benchmarks.semi_supervised --no-train --cost-rounds 7          # and measure the cost of an epoch

The table (mean and sample standard deviation over seeds) goes to `docs/benchmarks/semi_supervised.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .common import DOCS, MINILM, ROOT, config_settings, machine_info, resolve_model_path, train_run, write_json

TASKS = ("imdb", "goemotions")
CONDITIONS = ("plain", "vat", "vat_unlabeled", "vat_test")
DATA = ROOT.parent / "shared" / "data"
TRAINED = "semi_supervised_train.json"
DRAW_SEED = 42
# Per task: the recipe, its metric in all_results.json (and a second one reported beside it), the sequence length,
# and the defaults of --labels, --unlabeled and --steps.
TASK_SETTINGS = {
    "imdb": {
        "script": "imdb.py",
        "metric": "test_accuracy",
        "also": None,
        "max_length": 128,
        "labels": 200,
        "unlabeled": 5000,
        "steps": 125,
    },
    "goemotions": {
        "script": "multilabel.py",
        "metric": "test_micro_f1",
        "also": "test_roc_auc_macro",
        "max_length": 50,
        "labels": 1000,
        "unlabeled": 10000,
        "steps": 500,
    },
}


def prepare_data(task: str, args: argparse.Namespace) -> dict[str, Path]:
    """The task's files, written once under `<runs-dir>/<task>/data_v<validation>_u<unlabelled>/`: the training
    split is permuted with seed 42, then validation (IMDB only: GoEmotions has its dev split) takes the first rows,
    the unlabelled pool (text only) the next ones, and the labelled sets of every size the rows after those, so that
    a smaller labelled set is part of a larger one and none meets validation or the pool."""
    folder = args.runs_dir / task / f"data_v{args.validation_samples}_u{args.unlabeled}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(DRAW_SEED)
    if task == "imdb":
        source = args.data_dir / "imdb"
        if not (source / "train.csv.gz").is_file():
            raise SystemExit(f"{source}/train.csv.gz is missing; see ../shared/data/README.md (or pass --data-dir).")
        train = pd.read_csv(source / "train.csv.gz")
        validation = args.validation_samples
    else:
        source = args.data_dir / "goemotions"
        if not (source / "train.tsv").is_file():
            raise SystemExit(f"{source}/train.tsv is missing; see ../shared/data/README.md (or pass --data-dir).")
        columns = ["text", "labels", "id"]
        train = pd.read_csv(source / "train.tsv", sep="\t", header=None, names=columns, quoting=3, dtype=str)
        validation = 0
    order = rng.permutation(len(train))
    first_labelled = validation + args.unlabeled
    needed = first_labelled + max(args.labels)
    if needed > len(train):
        raise SystemExit(f"{task}: {needed} training rows needed, the split has {len(train)}.")
    parts = {"unlabeled": train.iloc[order[validation:first_labelled]][["text"]]}
    for n in args.labels:
        parts[f"labelled_{n}"] = train.iloc[order[first_labelled : first_labelled + n]]
    if task == "imdb":
        parts["validation"] = train.iloc[order[:validation]]
        test = pd.read_csv(source / "test.csv.gz")
        parts["test"] = test.sample(n=min(5000, len(test)), random_state=DRAW_SEED)
        files = {}
    else:
        files = {"validation": source / "dev.tsv", "test": source / "test.tsv", "labels": source / "labels.txt"}
    for name, frame in parts.items():
        if task == "imdb":
            path = folder / f"{name}.csv"
        else:
            path = folder / (f"{name}.jsonl" if name == "unlabeled" else f"{name}.tsv")
        if not path.is_file():
            if path.suffix == ".csv":
                frame.to_csv(path, index=False)
            elif path.suffix == ".jsonl":
                frame.to_json(path, orient="records", lines=True)
            else:
                frame.to_csv(path, sep="\t", header=False, index=False, quoting=3)
        files[name] = path
    return files


def train_command(task: str, labels: int, condition: str, seed: int, run_dir: Path, args) -> list[str]:
    files = prepare_data(task, args)
    settings = TASK_SETTINGS[task]
    batch = 16
    epochs = args.steps * batch / labels
    command = [
        sys.executable,
        str(ROOT / "recipes" / settings["script"]),
        str(ROOT / "recipes" / "configs" / f"{task}_none.yaml"),
        *("--model_name_or_path", resolve_model_path(args.model), "--output_dir", str(run_dir)),
        *("--run_name", f"{task}-{labels}-{condition}-seed{seed}", "--seed", str(seed)),
        *("--num_train_epochs", f"{epochs:g}", "--per_device_train_batch_size", str(batch)),
        *("--max_eval_samples", str(args.validation_samples), "--max_predict_samples", str(args.test_samples)),
        *("--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"),
        *("--max_seq_length", str(settings["max_length"]), "--logging_steps", "10"),
        *("--train_file", str(files[f"labelled_{labels}"]), "--validation_file", str(files["validation"])),
        *("--test_file", str(files["test"])),
    ]
    if task == "goemotions":
        command += ["--column_names", "text,labels,id", "--class_names_file", str(files["labels"])]
        command += ["--pos_weight", "auto"]
    if condition != "plain":
        for key, value in config_settings("vat").items():
            command += [f"--{key}", str(value)]
    if condition == "vat_unlabeled":
        command += ["--unlabeled_file", str(files["unlabeled"]), "--unlabeled_ratio", f"{args.ratio:g}"]
    elif condition == "vat_test":
        command += ["--unlabeled_from_test", "true", "--max_unlabeled_samples", str(args.unlabeled)]
        command += ["--unlabeled_ratio", f"{args.ratio:g}"]
    return command + shlex.split(args.recipe_args)


def run_one(task: str, labels: int, condition: str, seed: int, args) -> dict[str, Any] | None:
    run_dir = args.runs_dir / task / f"labels{labels}" / condition / f"seed{seed}"
    label = f"{task} {labels} labels, {condition}, seed {seed}"
    trained = train_run(
        run_dir,
        lambda output_dir: train_command(task, labels, condition, seed, output_dir, args),
        marker=TRAINED,
        label=label,
        tag="semi-supervised",
        no_train=args.no_train,
    )
    if not trained:
        return None
    results = json.loads((run_dir / "all_results.json").read_text())
    settings = TASK_SETTINGS[task]
    return {
        "task": task,
        "labels": labels,
        "condition": condition,
        "seed": seed,
        "metric": settings["metric"],
        "score": results[settings["metric"]],
        "also": results.get(settings["also"]) if settings["also"] else None,
        "test_loss": results.get("test_loss"),
        "train_seconds": results["train_runtime"],
        "epochs": results.get("epoch"),
        "labeled_rows": results.get("train_labeled_rows"),
        "unlabeled_rows": results.get("train_unlabeled_rows"),
    }


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task, number of labels and condition: spreads over seeds, and the wall time per labelled epoch
    as a ratio to `plain`'s of the same seeds (same machine, same invocation)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["labels"], run["condition"]), []).append(run)
    rows = []
    for (task, labels, condition), group in groups.items():
        plain = {r["seed"]: r for r in groups.get((task, labels, "plain"), [])}
        ratios = [r["train_seconds"] / plain[r["seed"]]["train_seconds"] for r in group if r["seed"] in plain]
        rows.append(
            {
                "task": task,
                "labels": labels,
                "condition": condition,
                "seeds": [r["seed"] for r in group],
                "metric": group[0]["metric"],
                "score": spread([r["score"] for r in group]),
                "also": spread([r["also"] for r in group]) if group[0]["also"] is not None else None,
                "test_loss": spread([r["test_loss"] for r in group]) if group[0].get("test_loss") else None,
                "unlabeled_rows_seen": group[0]["unlabeled_rows"],
                "time_ratio_to_plain": statistics.median(ratios) if ratios else None,
            }
        )
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return sorted(rows, key=lambda r: (r["task"], r["labels"], order[r["condition"]]))


def measure_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The cost of a labelled epoch, as `benchmarks.step_cost` measures a step: one process, rounds interleaved in a
    shuffled order, each step's time over the plain step's in the same round (median over rounds). A labelled epoch
    has the same number of steps in every condition, so the step's ratio is the epoch's: plain on 16 rows, VAT on the
    same 16, VAT on 16 labelled + 16 x `--ratio` unlabelled rows (labels -100), at 128 tokens."""
    import torch

    from .common import build_trainer, load_model, make_batch, summarize
    from .step_cost import prepare, run_step

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    vocab = model.config.vocab_size
    labelled = make_batch(vocab, 16, 128, seed=0)
    rows = 16 + round(16 * args.ratio)
    mixed = make_batch(vocab, rows, 128, seed=0)
    mixed["labels"][16:] = -100
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            "plain": (build_trainer("plain", model, tmp), labelled),
            "vat": (build_trainer("vat", model, tmp), labelled),
            "vat_unlabeled": (build_trainer("vat", model, tmp), mixed),
        }
        for trainer, _ in steps.values():
            prepare(trainer)
        rng = random.Random(0)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.cost_warmup + args.cost_rounds):
            order = list(steps)
            rng.shuffle(order)
            measured = {name: run_step(*steps[name])[0] for name in order}
            if r >= args.cost_warmup:
                for name, seconds in measured.items():
                    times[name].append(seconds)
            plain = measured["plain"]
            print(
                f"[semi-supervised] cost round {r + 1}: "
                + ", ".join(f"{n} {t / plain:.2f}x" for n, t in measured.items())
            )
    return {
        "rows": {"plain": 16, "vat": 16, "vat_unlabeled": rows},
        "rounds": args.cost_rounds,
        "threads": args.threads,
        "ratio_to_plain": {name: summarize([t / p for t, p in zip(ts, times["plain"])]) for name, ts in times.items()},
        "plain_seconds": summarize(times["plain"]),
    }


def markdown(data: dict[str, Any]) -> str:
    def pct(entry: dict | None) -> str:
        if entry is None:
            return ""
        sd = f" ± {100 * entry['std']:.1f}" if entry["std"] is not None else ""
        values = " / ".join(f"{100 * v:.1f}" for v in entry["values"])
        return f"{100 * entry['mean']:.1f}{sd} ({values})"

    def plain_number(entry: dict | None) -> str:
        if entry is None:
            return ""
        sd = f" ± {entry['std']:.3f}" if entry["std"] is not None else ""
        return f"{entry['mean']:.3f}{sd}"

    lines = [
        "# Semi-supervised VAT",
        "",
        f"Written by `{data['command']}` on {data['machine'].get('cpu', 'this machine')}. See the module docstring",
        "of `benchmarks/semi_supervised.py` for the set-up; scores in %, mean ± sample sd over seeds (the seeds'",
        "own scores in brackets); test loss: the training loss (cross-entropy; GoEmotions: BCE with its positive",
        "weights) on the scored test rows, lower is better calibrated; time: wall time per labelled epoch as a ratio",
        "to plain's, median over seeds (whole runs, not interleaved: see the cost below).",
        "",
        "| task | labels | condition | seeds | score | second metric | test loss | unlabelled rows seen "
        "| time vs plain |",
        "|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for row in data["rows"]:
        metric = {"test_accuracy": "accuracy", "test_micro_f1": "micro-F1 (tuned threshold)"}[row["metric"]]
        ratio = f"{row['time_ratio_to_plain']:.2f}x" if row["time_ratio_to_plain"] else ""
        lines.append(
            f"| {row['task']} | {row['labels']} | {row['condition']} | {','.join(map(str, row['seeds']))} | "
            f"{metric} {pct(row['score'])} | {'macro ROC-AUC ' + pct(row['also']) if row['also'] else ''} | "
            f"{plain_number(row.get('test_loss'))} | {row['unlabeled_rows_seen'] or ''} | {ratio} |"
        )
    if data["missing"]:
        lines += ["", "Not run yet: " + "; ".join(data["missing"]) + "."]
    cost = data.get("cost")
    if cost:
        ratios = cost["ratio_to_plain"]
        lines += [
            "",
            f"Cost of a labelled epoch (one step, interleaved, median of {cost['rounds']} rounds, {cost['threads']} "
            f"thread(s); plain step {cost['plain_seconds']['median']:.2f} s on 16 x 128): VAT on the 16 labelled rows "
            f"{ratios['vat']['median']:.2f}x, VAT with {cost['rows']['vat_unlabeled'] - 16} unlabelled rows more "
            f"{ratios['vat_unlabeled']['median']:.2f}x (quartiles {ratios['vat_unlabeled']['q1']:.2f}-"
            f"{ratios['vat_unlabeled']['q3']:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="imdb", help="comma-separated: imdb, goemotions")
    parser.add_argument(
        "--labels",
        default=None,
        help="numbers of labelled rows, comma-separated (imdb 200, goemotions 1000), or per task: "
        "'imdb=200,1000;goemotions=1000'; with --no-train, default: every size trained under --runs-dir",
    )
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated: {', '.join(CONDITIONS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--unlabeled", type=int, default=None, help="unlabelled pool (imdb 5000, goemotions 10000)")
    parser.add_argument("--ratio", type=float, default=2.0, help="unlabelled rows per labelled row in each batch")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of 16 labelled rows in every run (imdb 125, goemotions 500)",
    )
    parser.add_argument("--test-samples", type=int, default=1000, help="test rows scored (the same in every run)")
    parser.add_argument("--validation-samples", type=int, default=500)
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "semi_supervised")
    parser.add_argument("--recipe-args", default="", help="extra recipe flags")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="docs folder: benchmarks/semi_supervised.*")
    parser.add_argument("--no-train", action="store_true", help="publish the runs trained so far; train nothing")
    parser.add_argument(
        "--cost-rounds", type=int, default=0, help="measure the step cost of each condition over N rounds (0: no)"
    )
    parser.add_argument("--cost-warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the cost measurement")
    return parser


def label_sizes(value: str | None, task: str, default: int, trained_under: Path | None) -> list[int]:
    """The numbers of labelled rows of `task` that `--labels` names: 'N,M' for every task, or 'task=N,M;task=...'
    (a task it does not name gets its default). Without `--labels`, `[default]`, or with `trained_under` (--no-train)
    every size trained there."""
    if not value:
        if trained_under is None:
            return [default]
        folders = (p.name.removeprefix("labels") for p in trained_under.glob(f"{task}/labels*"))
        return sorted(int(n) for n in folders if n.isdigit()) or [default]
    if "=" not in value:
        parts = {task: value}
    else:
        parts = {}
        for item in filter(None, (v.strip() for v in value.split(";"))):
            name, _, sizes = item.partition("=")
            if name.strip() not in TASKS or not sizes.strip():
                raise SystemExit(f"--labels: {item!r} is not 'task=N,M' with a task among {list(TASKS)}")
            parts[name.strip()] = sizes
    if task not in parts:
        return [default]
    try:
        return [int(n) for n in parts[task].split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"--labels: {parts[task]!r} is not a comma-separated list of numbers") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    for name, values, valid in (("--tasks", tasks, TASKS), ("--conditions", conditions, CONDITIONS)):
        unknown = [v for v in values if v not in valid]
        if unknown or not values:
            raise SystemExit(f"{name}: unknown or no values {unknown}; choose from {list(valid)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, missing = [], []
    for task in tasks:
        task_args = argparse.Namespace(**vars(args))
        defaults = TASK_SETTINGS[task]
        task_args.labels = label_sizes(args.labels, task, defaults["labels"], args.runs_dir if args.no_train else None)
        task_args.unlabeled = args.unlabeled or defaults["unlabeled"]
        task_args.steps = args.steps or defaults["steps"]
        for labels in task_args.labels:
            for seed in seeds:
                for condition in conditions:
                    run = run_one(task, labels, condition, seed, task_args)
                    if run is None:
                        missing.append(f"{task} {labels} {condition} seed {seed}")
                    else:
                        runs.append(run)
    data = {
        "command": shlex.join(
            ["python", "-m", "benchmarks.semi_supervised", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine_info(),
        "settings": {
            "steps": {task: args.steps or TASK_SETTINGS[task]["steps"] for task in tasks},
            "ratio": args.ratio,
            "test_samples": args.test_samples,
            "vat": config_settings("vat"),
        },
        "rows": aggregate(runs),
        "runs": runs,
        "missing": missing,
        "cost": measure_cost(args) if args.cost_rounds > 0 else None,
    }
    out = args.output_dir / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "semi_supervised.json"
    if data["cost"] is None and previous.is_file():  # kept until measured again
        data["cost"] = json.loads(previous.read_text()).get("cost")
    write_json(out / "semi_supervised.json", data)
    (out / "semi_supervised.md").write_text(markdown(data))
    from .report import render

    render(args.output_dir)  # docs/benchmarks.md gets the table too
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
