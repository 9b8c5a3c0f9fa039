"""The recipes' summaries: training and saving, the one-screen summary printed at the end, and the robustness
report written beside the model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hf_adv.cli import UsageError, one_line
from hf_adv.distillation import Distillation

from .arguments import RobustnessReportArguments


# -- reporting --------------------------------------------------------------------------------------------------------
def build_trainer(trainer_class, **kwargs):
    """`trainer_class(**kwargs)`, with a set-up the trainer refuses (a `ValueError` at construction: a method's flags,
    the distillation teacher) answered in one line, exit status 2, as a bad flag is."""
    try:
        return trainer_class(**kwargs)
    except ValueError as error:
        raise UsageError(one_line(error)) from error


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


def describe_unlabeled(count: int, sources: list[str], ratio: float, train_metrics: dict) -> str:
    """The unlabelled texts and the rows training saw, for the summary."""
    seen = ""
    if "train_labeled_rows" in train_metrics:
        seen = (
            f"; seen {train_metrics['train_labeled_rows']} labelled and {train_metrics['train_unlabeled_rows']} "
            "unlabelled rows"
        )
    return f"{count} texts ({', '.join(sources)}), {ratio:g} per labelled row{seen}"


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
    distillation = Distillation.describe(args)
    if distillation:
        parts.append(distillation)
    return " + ".join(parts) if parts else "none (plain fine-tuning)"


def rows_of(frame: pd.DataFrame) -> list[int]:
    """1-based row numbers of the examples in the source, carried through sampling to the predictions file."""
    return [int(index) + 1 for index in frame.index]


# -- robustness report ------------------------------------------------------------------------------------------------
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
