"""Quality: what each method buys on real data, clean and under attack, over several seeds.

For every task x method x seed: train with the recipe (`recipes/imdb.py` or `recipes/multilabel.py`, in a
subprocess, as a user runs it), then score the model with `hf_adv.robustness` on one sample of test examples shared
by all runs: the clean score (accuracy; micro-F1 for GoEmotions) and the score under PGD at each epsilon. The table
gives the mean and the sample standard deviation over seeds; each run's own files stay in `--runs-dir`.

Runs resume: a model is trained in `<run>.partial` and moved to `<run>` when the recipe succeeds, with the training
command in `<run>/quality_train.json`; such a run is not trained again (and is refused if this invocation would train
it with other settings), and one whose `quality.json` was scored with the same settings is not scored again, so an
interrupted grid picks up where it stopped and seeds can be added later. A run folder that holds a model but no
`quality_train.json` (trained by hand with the recipe) is scored as it is, with a warning.

    python -m benchmarks.quality                          # IMDB and GoEmotions, 5 methods, seeds 0 1 2 (hours)
    python -m benchmarks.quality --tasks imdb --seeds 0 --output-dir /tmp/q   # one seed of IMDB, docs/ untouched

`docs/benchmarks/quality.json` and the table hold the grid of the last invocation only (`--tag NAME` writes an
extra grid to `quality_NAME.json` instead, with its own section). With `--no-train` that
invocation trains nothing: the table holds the runs of its grid trained so far (each method's row names its seeds),
the others are listed under `missing`, so a grid can be published while it is still running.

Each method's settings are the adversarial keys (`adv_*`, `awp_*`, `vat_*`) of `recipes/configs/imdb_<method>.yaml`
on top of `<task>_none.yaml`, so both tasks train a method the same way. AWP is the exception: `imdb_awp.yaml` trains
one clean epoch and then one AWP epoch; here AWP starts at half the epochs instead (`--adv_start_epoch`), so it
perturbs only the second half of the steps, at the lower half of the decaying learning rate.

The clean score of GoEmotions is micro-F1 with every logit thresholded at 0 (probability 0.5), as the robustness
module scores it; the recipe's own test score uses the threshold tuned on the validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    DOCS,
    MINILM,
    ROOT,
    by_run_name,
    command_line,
    config_settings,
    machine_info,
    resolve_model_path,
    train_run,
    write_json,
)

TASKS = ("imdb", "goemotions")
CONFIGS = ROOT / "recipes" / "configs"
# A method of the grid is a config, `recipes/configs/imdb_<method>.yaml` (`fgm_example` is FGM in example scope).
QUALITY_METHODS = tuple(sorted(p.stem.removeprefix("imdb_") for p in CONFIGS.glob("imdb_*.yaml")))
DEFAULT_METHODS = ("none", "fgm", "pgd", "awp", "vat")
DATA = ROOT.parent / "shared" / "data"
TEACHER = "<runs-dir>/<task>/<teacher>/seed<seed>"  # the teacher of a distillation run, as the config records it
TRAINED = "quality_train.json"  # in a run folder: the command that trained its model, written once it succeeded


def method_flags(method: str, epochs: float, teacher: Path | None = None) -> list[str]:
    """The recipe flags that select `method`, read from `recipes/configs/imdb_<method>.yaml`. A distillation config's
    `distill_teacher` becomes `teacher`: the run of the same task and seed of the method the config names
    (`runs/imdb_none`: the plain run; see `teacher_method`)."""
    flags = []
    for key, value in config_settings(method).items():
        if key == "distill_teacher":
            value = teacher if teacher is not None else TEACHER
        if key != "adv_start_epoch":
            flags += [f"--{key}", str(value)]
    if method == "awp":
        flags += ["--adv_start_epoch", str(epochs / 2)]
    return flags


def task_files(task: str, data_dir: Path) -> dict[str, Path]:
    if task == "imdb":
        files = {"train": data_dir / "imdb" / "train.csv.gz", "test": data_dir / "imdb" / "test.csv.gz"}
    else:
        folder = data_dir / "goemotions"
        files = {name: folder / f"{name}.tsv" for name in ("train", "dev", "test")}
        files["labels"] = folder / "labels.txt"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"{task}: missing data files {missing}; see ../shared/data/README.md (or pass --data-dir).")
    return files


def train_command(task: str, method: str, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    files = task_files(task, args.data_dir)
    if task == "imdb":
        script, epochs = "imdb.py", args.imdb_epochs
        data = [
            *("--train_file", str(files["train"]), "--test_file", str(files["test"])),
            *("--max_train_samples", str(args.imdb_train_samples), "--max_seq_length", str(args.imdb_max_length)),
        ]
    else:
        script, epochs = "multilabel.py", args.goemotions_epochs
        data = [
            *("--train_file", str(files["train"]), "--validation_file", str(files["dev"])),
            *("--test_file", str(files["test"]), "--column_names", "text,labels,id"),
            *("--class_names_file", str(files["labels"]), "--max_train_samples", str(args.goemotions_train_samples)),
            *("--max_seq_length", str(args.goemotions_max_length)),
            *(["--pos_weight", args.goemotions_pos_weight] if args.goemotions_pos_weight != "none" else []),
        ]
    return [
        sys.executable,
        str(ROOT / "recipes" / script),
        str(CONFIGS / f"{task}_none.yaml"),
        *("--model_name_or_path", resolve_model_path(args.model), "--output_dir", str(run_dir)),
        *("--run_name", f"{task}-{method}-seed{seed}", "--seed", str(seed), "--num_train_epochs", str(epochs)),
        *("--max_eval_samples", str(args.eval_samples), "--max_predict_samples", str(args.test_samples)),
        *("--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"),
        *data,
        *method_flags(method, epochs, teacher_dir(task, seed, args, method)),
        *shlex.split(args.recipe_args),
    ]


def teacher_method(method: str) -> str | None:
    """The grid method whose run teaches a distillation config: its `distill_teacher` names the folder the config's
    comment trains, `runs/imdb_<method>` (`none` for the plain run; e.g. a config trained with
    `distill_train_temperature`, Papernot et al.'s teacher); None for a config that is no distillation."""
    teacher = config_settings(method).get("distill_teacher")
    if teacher is None:
        return None
    name = Path(str(teacher)).name.removeprefix("imdb_")
    if name not in QUALITY_METHODS:
        raise SystemExit(
            f"recipes/configs/imdb_{method}.yaml: distill_teacher {teacher!r} names no config of the grid; write it "
            f"runs/imdb_<config> with <config> one of {list(QUALITY_METHODS)}."
        )
    return name


def teacher_dir(task: str, seed: int, args: argparse.Namespace, method: str | None = None) -> Path:
    """The teacher of a distillation run: the run of `teacher_method(method)` (default: the plain run) of its task
    and seed."""
    teacher = (teacher_method(method) if method is not None else None) or "none"
    return args.runs_dir / task / teacher / f"seed{seed}"


def robustness_argv(task: str, method: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    files = task_files(task, args.data_dir)
    if task == "imdb":
        data = ["--dataset", str(files["test"]), "--max_length", str(args.imdb_max_length)]
    else:
        data = [
            *("--dataset", str(files["test"]), "--column_names", "text", "labels", "id"),
            *("--label_column", "labels", "--max_length", str(args.goemotions_max_length)),
        ]
    return [
        *("--model_paths", str(run_dir), "--model_names", method, *data),
        *("--num_examples", str(args.test_samples), "--seed", "0", "--attacks", *args.attacks),
        *("--epsilons", *map(str, args.epsilons), "--pgd_steps", str(args.pgd_steps)),
        # Left out for the cross-entropy alone, so that runs scored before the flag existed match.
        *(["--attack_loss", *args.attack_losses] if args.attack_losses != ["ce"] else []),
        *("--output_dir", str(run_dir / "robustness")),
    ]


def same_scoring(previous: list[str], scoring: list[str]) -> bool:
    """Whether a run scored with the `previous` robustness flags has the scores `scoring` asks for: the same flags,
    but for `--attacks`, of which it may have run more (the attacks are deterministic and independent, so PGD's
    scores do not depend on what else ran)."""

    def split(argv: list[str]) -> tuple[list[str], set[str]]:
        if "--disable_tqdm" in argv:  # how it showed progress does not matter
            i = argv.index("--disable_tqdm")
            argv = argv[:i] + argv[i + 2 :]
        start = argv.index("--attacks") + 1
        end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
        return argv[: start - 1] + argv[end:], set(argv[start:end])

    if "--attacks" not in previous:
        return False
    (rest, attacks), (wanted_rest, wanted) = split(previous), split(scoring)
    return rest == wanted_rest and wanted <= attacks


def train(task: str, method: str, seed: int, run_dir: Path, args: argparse.Namespace, label: str) -> bool:
    """Train the run's model with the recipe unless it is there already (see the module docstring); whether the
    run has a model now (False only under `--no-train`)."""
    return train_run(
        run_dir,
        lambda output_dir: train_command(task, method, seed, output_dir, args),
        marker=TRAINED,
        label=label,
        tag="quality",
        no_train=args.no_train,
        adopt_untracked=True,
    )


def run_one(task: str, method: str, seed: int, args: argparse.Namespace, label: str) -> dict[str, Any] | None:
    """Train (unless done) and score (unless already scored the same way) one run; None for a run left out by
    `--no-train`."""
    from hf_adv import robustness

    run_dir = args.runs_dir / task / method / f"seed{seed}"
    scoring = robustness_argv(task, method, run_dir, args)
    saved = run_dir / "quality.json"
    teacher = teacher_method(method)
    if teacher is not None and not train(
        task, teacher, seed, teacher_dir(task, seed, args, method), args, f"{label} (its teacher, {teacher})"
    ):
        return None
    if not train(task, method, seed, run_dir, args, label):
        return None
    if saved.is_file():
        previous = json.loads(saved.read_text())
        # Compared with the run folder by name, so that another spelling of --runs-dir (a link) is the same run.
        by_name = by_run_name(previous.get("scoring", []), Path(previous.get("run_dir", run_dir)))
        if same_scoring(by_name, by_run_name(scoring, run_dir)):
            print(f"[quality] {label}: scored before, {saved}", flush=True)
            return previous
    print(f"[quality] {label}: scoring", flush=True)
    try:
        scored = robustness.main(scoring)
    except Exception as error:
        raise RuntimeError(f"{label}: scoring the model in {run_dir} failed") from error
    by_loss = {args.attack_losses[0]: scored[method]} if method in scored else {}
    for loss in args.attack_losses:
        by_loss.setdefault(loss, scored.get(f"{method} ({loss} attack)"))
    metrics = by_loss[args.attack_losses[0]]
    results_file = run_dir / "train_results.json"
    trained = json.loads(results_file.read_text()) if results_file.exists() else {}
    result = {
        "task": task,
        "method": method,
        "seed": seed,
        "run_dir": str(run_dir),
        "scoring": scoring,
        "metric": metrics["metric"],
        "num_examples": metrics["num_examples"],
        "clean": metrics["clean_accuracy"],
        "pgd": {key.split("@")[1]: value for key, value in metrics.items() if key.startswith("pgd_accuracy@")},
        # Under each attack loss (`--attack-losses`): "pgd" is the first's.
        **{
            f"pgd_{loss}": {k.split("@")[1]: v for k, v in scores.items() if k.startswith("pgd_accuracy@")}
            for loss, scores in by_loss.items()
            if loss != "ce"
        },
        "train_seconds": trained.get("train_runtime"),
        "scoring_seconds": metrics["seconds"],
    }
    write_json(saved, result)
    return result


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method: the spread over seeds of the clean score, of each PGD score and of the training time."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        table.setdefault(run["task"], {}).setdefault(run["method"], {"runs": []})["runs"].append(run)
    for methods in table.values():
        for entry in methods.values():
            runs_of = entry.pop("runs")
            entry["seeds"] = [r["seed"] for r in runs_of]
            entry["metric"] = runs_of[0]["metric"]
            entry["clean"] = spread([r["clean"] for r in runs_of])
            entry["pgd"] = {eps: spread([r["pgd"][eps] for r in runs_of]) for eps in runs_of[0]["pgd"]}
            if all("pgd_margin" in r for r in runs_of):
                entry["pgd_margin"] = {
                    eps: spread([r["pgd_margin"][eps] for r in runs_of]) for eps in runs_of[0]["pgd_margin"]
                }
            times = [r["train_seconds"] for r in runs_of if r["train_seconds"] is not None]
            entry["train_seconds"] = spread(times) if times else None
    return table


def parse_list(value: str, valid: tuple[str, ...], flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown or no values {unknown}; choose from {list(valid)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: imdb, goemotions")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated config names (recipes/configs/imdb_<name>.yaml): {', '.join(QUALITY_METHODS)}",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--model", default=MINILM, help="`minilm` (the installed all-MiniLM-L6-v2) or a model path")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="holds imdb/ and goemotions/ as ../shared/data")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "quality", help="one folder per run")
    parser.add_argument("--imdb-train-samples", type=int, default=2000)
    parser.add_argument("--imdb-epochs", type=float, default=1.0)
    parser.add_argument("--imdb-max-length", type=int, default=128)
    parser.add_argument("--goemotions-train-samples", type=int, default=8000)
    parser.add_argument("--goemotions-epochs", type=float, default=1.0)
    parser.add_argument("--goemotions-max-length", type=int, default=50)
    parser.add_argument(
        "--goemotions-pos-weight",
        default="auto",
        help="the multilabel recipe's --pos_weight ('none' to leave it out): without it the 28 sigmoids collapse to "
        "the label priors at these settings (see docs/benchmarks.md)",
    )
    parser.add_argument("--eval-samples", type=int, default=500, help="validation examples the recipe scores")
    parser.add_argument("--test-samples", type=int, default=1000, help="test examples scored clean and attacked")
    parser.add_argument("--attacks", nargs="+", default=["pgd"], help="hf_adv.robustness attacks (pgd at least)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="PGD radii (L2)")
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument(
        "--attack-losses",
        default="ce",
        help="comma-separated losses PGD maximizes (ce, margin): ce is the table's PGD columns; margin (the logit "
        "difference, which defensive distillation does not hide) adds PGD-margin columns",
    )
    parser.add_argument("--recipe-args", default="", help="extra recipe flags, e.g. '--learning_rate 3e-5'")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="docs folder: benchmarks/quality.{json,png}")
    parser.add_argument(
        "--tag", default="", help="name of an extra grid: written to quality_<tag>.json, its own section of the page"
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: the table holds the runs of the grid trained already (scored if they are not yet) and "
        "lists the others as missing",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    tasks = parse_list(args.tasks, TASKS, "--tasks")
    methods = parse_list(args.methods, QUALITY_METHODS, "--methods")
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"--seeds: comma-separated integers, got {args.seeds!r}")
    from hf_adv.robustness import ATTACKS

    if "pgd" not in args.attacks or not set(args.attacks) <= set(ATTACKS):
        raise SystemExit(f"--attacks: pgd (the score under attack) and any of {list(ATTACKS)}, got {args.attacks}")
    from hf_adv.robustness import ATTACK_LOSSES

    args.attack_losses = parse_list(args.attack_losses, ATTACK_LOSSES, "--attack-losses")
    if "ce" in args.attack_losses:  # the cross-entropy's scores are the table's PGD columns
        args.attack_losses = ["ce", *(loss for loss in args.attack_losses if loss != "ce")]
    if not all(e > 0 for e in args.epsilons):
        raise SystemExit(f"--epsilons must all be > 0, got {args.epsilons}")
    for task in tasks:
        task_files(task, args.data_dir)  # every file checked before hours of training
    machine = machine_info()
    grid = [(task, method, seed) for task in tasks for method in methods for seed in seeds]
    runs, missing = [], []
    start = time.perf_counter()
    for k, (task, method, seed) in enumerate(grid, 1):
        label = f"run {k}/{len(grid)} ({time.perf_counter() - start:.0f} s so far): {task} {method} seed {seed}"
        run = run_one(task, method, seed, args, label)
        if run is None:
            missing.append({"task": task, "method": method, "seed": seed})
        else:
            runs.append(run)
    if not runs:
        raise SystemExit(f"no run of the grid is trained yet ({len(grid)} left out by --no-train); nothing written")
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    data = {
        "command": command_line("benchmarks.quality")
        if argv is None
        else shlex.join(["python", "-m", "benchmarks.quality", *argv]),
        "machine": machine,
        "config": {
            "model": args.model,
            "seeds": seeds,
            "imdb": {
                "train_samples": args.imdb_train_samples,
                "epochs": args.imdb_epochs,
                "max_length": args.imdb_max_length,
            },
            "goemotions": {
                "train_samples": args.goemotions_train_samples,
                "epochs": args.goemotions_epochs,
                "max_length": args.goemotions_max_length,
                "pos_weight": args.goemotions_pos_weight,
            },
            "test_samples": args.test_samples,
            "epsilons": args.epsilons,
            "pgd_steps": args.pgd_steps,
            "attack_losses": args.attack_losses,
            "recipe_args": args.recipe_args,
            "method_flags": {
                task: {
                    m: method_flags(m, args.imdb_epochs if task == "imdb" else args.goemotions_epochs) for m in methods
                }
                for task in tasks
            },
        },
        "runs": runs,
        "missing": missing,
        "results": aggregate(runs),
    }
    result = args.output_dir / "benchmarks" / (f"quality_{args.tag}.json" if args.tag else "quality.json")
    write_json(result, data)
    from . import report

    print(report.quality_table(data["results"]))
    print(f"Wrote {report.render(args.output_dir)} and {result}")
    return data


if __name__ == "__main__":
    main()
