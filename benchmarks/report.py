"""Render `docs/benchmarks.md` (and a PNG chart) from the JSON results the benchmark scripts write.

Each script calls `render()` after writing its JSON, so the page always shows the latest results of every
benchmark that has been run. To re-render without measuring: `python -m benchmarks.report [--output-dir docs]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import DOCS, ROOT, TARGETS

LABELS = {
    "plain": "plain `Trainer`",
    "plain_x2": "floor: plain forward+backward twice",
    "fgm": "hf_adv `fgm`",
    "fgsm": "hf_adv `fgsm`",
    "pgd": "hf_adv `pgd` (K=3)",
    "awp": "hf_adv `awp`",
    "vat": "hf_adv VAT (1 iteration)",
    "fgm+vat": "hf_adv `fgm` + VAT",
    "classic_fgm": "classic FGM (embedding clone)",
    "classic_pgd": "classic PGD (K=3, gradient backup)",
    "classic_awp": "classic AWP (3 weight copies)",
    "classic_vat": "reference VAT (full probe backward)",
    "classic_vat_one_backward": "VAT written the fast way (autograd.grad probe, one backward)",
    "fgm_example": "hf_adv `fgm`, example scope",
    "fgm_fraction": "hf_adv `fgm` on 1/4 of the rows (eps 0.5)",
    "pgd_example": "hf_adv `pgd` (K=3), example scope",
    "carry": "hf_adv `carry` (carried FGM, one pass)",
    "freelb": "hf_adv `freelb` (K=2)",
    "freelb_k3": "hf_adv `freelb` (K=3)",
    "freelb_clean": "hf_adv `freelb` (K=2) + clean loss",
    "freelb_k3_clean": "hf_adv `freelb` (K=3) + clean loss",
    "rdrop": "hf_adv R-Drop",
}

THREADS_NOTE = """\
Timed with one torch thread (`--threads 1`) because other processes shared the 2 cores: with torch's default of 2
threads, each OpenMP parallel region waits for whichever of its threads the scheduler has parked, so at a load
average of about 7 a plain MiniLM forward+backward took 5.9-8.3 s wall (3.8-5.5 s CPU, spent partly spinning)
against 2.5-3.2 s wall (1.6-2.0 s CPU) with one thread, and step ratios swung by +-1x from round to round. On an
idle machine, drop `--threads 1` to time with the default threads (not measured here)."""

MEMORY_NOTE = """\
Memory is measured per method in its own process (`--memory-child`): "extra peak tensors" is the peak of live
tensor bytes during one step (CPU allocator events from `torch.profiler`, `profile_memory=True`), minus the same
for the plain step: exact bytes of backups, clones, bounds, kept graphs and extra gradients. "extra peak RSS" is
the growth of the process's peak resident set (`VmHWM`, reset before the steps) minus the plain one: what the
operating system sees, including what the allocator caches and fragments, so it is much coarser: differences below
about 100 MB between methods are noise there. The floor row (two plain passes) is the reference for both."""


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _ratio(r: dict) -> str:
    return f"{r['median']:.2f}x"


def _spread(r: dict) -> str:
    return f"{r['q1']:.2f}-{r['q3']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def _cpu_ratio(r: dict) -> str:
    return _ratio(r["cpu_ratio"]) if "cpu_ratio" in r else "n/a"


def step_cost_table(data: dict) -> str:
    rows = [
        "| method | ratio to plain (median) | quartiles (min-max) | fastest / fastest plain | CPU-time ratio "
        "| median step | extra peak tensors | extra peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in data["methods"].items():
        memory = r.get("memory") or {}
        extra_tensors = _fmt(memory.get("extra_tensor_mb"), "+.1f", " MB")
        extra_rss = _fmt(memory.get("extra_rss_mb"), "+.1f", " MB")
        rows.append(
            f"| {LABELS.get(method, method)} | {_ratio(r['ratio'])} | {_spread(r['ratio'])} "
            f"| {r['ratio_of_minimums']:.2f}x | {_cpu_ratio(r)} | {r['seconds']['median']:.3f} s "
            f"| {extra_tensors} | {extra_rss} |"
        )
    return "\n".join(rows)


def targets_table(data: dict) -> str:
    rows = [
        "| method | target | measured (median) | ours / floor, paired by round | ours / classic, paired by round "
        "(median, min-max) | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, (target, classic) in TARGETS.items():
        r = data["methods"].get(method)
        if r is None or "check" not in r:
            continue
        check = r["check"]
        versus, verdict = "", ["met" if check["met_target"] else "**missed**"]
        if "vs_classic" in check:
            v = check["vs_classic"]
            classic = check.get("classic", classic)  # the one compared when measured
            versus = f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) vs {LABELS.get(classic, classic)}"
            verdict.append("below classic" if check["below_classic"] else "**not below classic**")
        floor = check.get("vs_floor")
        floor = f"{floor['median']:.2f} ({floor['min']:.2f}-{floor['max']:.2f})" if floor else ""
        compared = check.get("classic")
        goal = f"<= {check.get('target', target)}x" + (
            f" and below {LABELS.get(compared, compared)}" if compared else ""
        )
        rows.append(
            f"| {LABELS.get(method, method)} | {goal} | {_ratio(r['ratio'])} | {floor} | {versus} "
            f"| {', '.join(verdict)} |"
        )
    return "\n".join(rows)


def end_to_end_table(data: dict) -> str:
    rows = [
        "| method | wall time over plain (median) | quartiles (min-max) | median `train()` |",
        "| --- | --- | --- | --- |",
    ]
    for method, r in data["methods"].items():
        rows.append(
            f"| {LABELS.get(method, method)} | {_ratio(r['ratio'])} | {_spread(r['ratio'])} "
            f"| {r['seconds']['median']:.1f} s |"
        )
    return "\n".join(rows)


def _model_name(spec: str) -> str:
    names = {"minilm": "all-MiniLM-L6-v2", "tiny": "tiny BERT (2 layers, hidden 32, from a config)"}
    return f"{names[spec]} (`--model {spec}`)" if spec in names else f"`{spec}`"


def _machine(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs ({info['torch_threads']} torch threads), "
        f"{info['ram_gb']} GB RAM, {info['platform']}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, accelerate {info['accelerate']}, hf_adv {info['hf_adv']}. "
        f"Run on {info['date']}; load average {info['load_average_at_start']} at start, "
        f"{info.get('load_average_at_end')} at end (other processes shared the CPUs)."
    )


def plot_step_cost(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(data["methods"])[::-1]
    ratios = [data["methods"][m]["ratio"] for m in methods]
    medians = [r["median"] for r in ratios]
    errors = [[r["median"] - r["q1"] for r in ratios], [r["q3"] - r["median"] for r in ratios]]
    colors = {"plain": "#888888", "floor": "#bbbbbb", "ours": "#1f77b4", "classic": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(methods) + 1.4))
    ax.barh(
        [LABELS.get(m, m).replace("`", "") for m in methods],
        medians,
        xerr=errors,
        color=[colors[data["methods"][m]["kind"]] for m in methods],
        capsize=3,
    )
    for i, m in enumerate(methods):
        ax.text(max(medians[i], ratios[i]["q3"]) + 0.08, i, f"{medians[i]:.2f}x", va="center", fontsize=8)
        if m in TARGETS:
            ax.plot([TARGETS[m][0]] * 2, [i - 0.42, i + 0.42], color="#d62728", linewidth=2)
    config = data["config"]
    ax.set_xlim(0, max(r["q3"] for r in ratios) + 0.6)
    ax.set_xlabel("step time / plain step: median over rounds; whiskers: quartiles; red: target")
    model = {"minilm": "all-MiniLM-L6-v2"}.get(config["model"], config["model"])
    ax.set_title(f"{model}, batch {config['batch_size']} x {config['seq_len']}, CPU", fontsize=10)
    ax.axvline(1.0, color="#888888", linewidth=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def step_cost_section(data: dict, results_dir: Path, stem: str) -> list[str]:
    config, machine = data["config"], data["machine"]
    title = "## Cost of one training step"
    if config.get("tag"):
        title += f" ({config['tag']})"
    lines = [
        title,
        "",
        f"Model {_model_name(config['model'])} ({config['parameters'] / 1e6:.1f}M parameters), batch "
        f"{config['batch_size']} x {config['seq_len']} tokens, CPU, {machine['torch_threads']} torch thread(s). One "
        f"`training_step` (forwards and backwards, no optimizer update), {config['rounds']} interleaved rounds in "
        f"one process after {config['warmup']} warm-up round(s); each round runs every method once in a shuffled "
        "order, and a method's ratio is taken to the plain step of the same round. The floor row runs the plain "
        "forward and backward twice (the second backward adding to the first's gradients): the least any method "
        "with two full passes can cost here.",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {_machine(machine)}",
        "",
    ]
    if machine["torch_threads"] == 1 and (machine["logical_cpus"] or 1) > 1:
        lines += [THREADS_NOTE, ""]
    lines += [step_cost_table(data), ""]
    if plot_step_cost(data, results_dir / f"{stem}.png"):
        lines += [f"![step cost](benchmarks/{stem}.png)", ""]
    lines += ["### Targets", "", targets_table(data), "", MEMORY_NOTE]
    plain_memory = data["methods"]["plain"].get("memory")
    if plain_memory:
        lines += [
            "",
            f"Every method but plain runs a second backward while the clean gradients "
            f"({plain_memory['tensor_after_step_mb']:.1f} MB here, one copy of the weights in fp32) are alive, "
            "so about that much extra peak is common to all of them (the floor row shows it); what a method keeps "
            "of its own is the rest.",
        ]
    return [*lines, ""]


def _mean_sd(entry: dict, scale: float = 100.0) -> str:
    text = f"{entry['mean'] * scale:.1f}"
    return text + (f" ± {entry['std'] * scale:.1f}" if entry["std"] is not None else "")


TASK_TITLES = {"imdb": "IMDB", "goemotions": "GoEmotions"}


def _metric_label(entry: dict) -> str:
    return "micro-F1" if entry["metric"] == "f1_micro" else "accuracy"


def quality_table(results: dict) -> str:
    epsilons = sorted({eps for methods in results.values() for m in methods.values() for eps in m["pgd"]}, key=float)
    # PGD on the logit margin beside the cross-entropy's, when some run was scored with it (`--attack-losses`).
    margins = sorted(
        {eps for methods in results.values() for m in methods.values() for eps in m.get("pgd_margin", {})}, key=float
    )
    headers = [f"PGD eps {eps}" for eps in epsilons] + [f"PGD-margin eps {eps}" for eps in margins]
    rows = [
        "| task | method | clean | " + " | ".join(headers) + " | seeds | training time |",
        "| --- | --- | --- | " + " | ".join("---" for _ in headers) + " | --- | --- |",
    ]
    for task, methods in results.items():
        for method, entry in methods.items():
            cells = [_mean_sd(entry["pgd"][eps]) if eps in entry["pgd"] else "" for eps in epsilons]
            margin = entry.get("pgd_margin", {})
            cells += [_mean_sd(margin[eps]) if eps in margin else "" for eps in margins]
            pgd = " | ".join(cells)
            seconds = entry.get("train_seconds")
            time_text = f"{seconds['mean'] / 60:.1f} min" if seconds else "n/a"
            metric = _metric_label(entry)
            rows.append(
                f"| {TASK_TITLES.get(task, task)} ({metric}) | {method} | {_mean_sd(entry['clean'])} | {pgd} "
                f"| {', '.join(map(str, entry['seeds']))} | {time_text} |"
            )
    return "\n".join(rows)


def plot_quality(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.8), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items()):
        names = list(methods)
        series = [("clean", lambda m: m["clean"])]
        for eps in sorted(next(iter(methods.values()))["pgd"], key=float):
            series.append((f"PGD eps {eps}", lambda m, eps=eps: m["pgd"][eps]))
        width = 0.8 / len(series)
        for j, (label, get) in enumerate(series):
            entries = [get(methods[n]) for n in names]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [100 * e["mean"] for e in entries], width, label=label)
            spread = [(x, e) for x, e in zip(xs, entries) if e["std"] is not None]  # one seed: no bar, not a 0
            if spread:
                ax.errorbar(
                    [x for x, _ in spread],
                    [100 * e["mean"] for _, e in spread],
                    yerr=[100 * e["std"] for _, e in spread],
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=2,
                )
        metric = _metric_label(next(iter(methods.values())))
        seeds = [len(methods[n]["seeds"]) for n in names]
        ax.set_xticks(range(len(names)), [f"{n}\n{k} seed{'s' if k > 1 else ''}" for n, k in zip(names, seeds)])
        ax.set_ylabel(f"test {metric} (%), mean ± sd over seeds")
        ax.set_title(TASK_TITLES.get(task, task), fontsize=10)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=len(series), loc="upper center", frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def quality_section(data: dict, results_dir: Path, cost_above: bool, name: str = "quality") -> list[str]:
    """`cost_above`: the page has the step-cost section the text points to (a quality-only page points to
    docs/benchmarks.md). `name`: the JSON file's stem (`quality`, or `quality_<tag>` for an extra grid)."""
    config = data["config"]
    methods = {method for task in data["results"].values() for method in task}
    recipe_args = config.get("recipe_args", "")
    imdb, goemotions = config["imdb"], config["goemotions"]
    data_text = []
    if "imdb" in data["results"]:
        data_text.append(
            f"IMDB: {imdb['train_samples']} training reviews, {imdb['epochs']:g} epoch(s), "
            f"{imdb['max_length']} tokens."
        )
    if "goemotions" in data["results"]:
        pos_weight = goemotions.get("pos_weight", "none")  # not recorded before it became a setting
        data_text.append(
            f"GoEmotions: {goemotions['train_samples']} training comments, {goemotions['epochs']:g} epoch(s), "
            f"{goemotions['max_length']} tokens"
            + (f", `--pos_weight {pos_weight}`" if pos_weight != "none" else "")
            + ", scored by micro-F1 with every logit thresholded at 0 (the recipe's "
            "own test score tunes the threshold on validation)."
        )
    tag = name.removeprefix("quality").removeprefix("_")
    lines = [
        "## Quality: clean and under attack" + (f" ({tag})" if tag else ""),
        "",
        f"Model {_model_name(config['model'])}, trained with the recipes (`benchmarks/quality.py` lists the flags), "
        f"seeds {', '.join(map(str, config['seeds']))}. " + " ".join(data_text) + " Scored by "
        f"`hf_adv.robustness` on {config['test_samples']} test examples (the same sample for every run): clean, and "
        f"under PGD-{config['pgd_steps']} at L2 radius epsilon per example on the embedding output. Scores in %, "
        "mean ± sample standard deviation over seeds (no ± with one seed). "
        + (f"Every run had the extra recipe flags `{recipe_args}`. " if recipe_args else "")
        + (
            "AWP perturbs only the second half of the steps (`--adv_start_epoch` at half the epochs), not a whole "
            "extra epoch as `imdb_awp.yaml` does. "
            if "awp" in methods
            else ""
        )
        + "Training time is the recipe's `train_runtime`, wall clock on whatever shared the CPU: the cost of each "
        + ("method is in the step-cost section above" if cost_above else "method is in docs/benchmarks.md")
        + ", not here. The machine line is that of the invocation that wrote the table; runs scored before it keep "
        "their own times.",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {_machine(data['machine'])}",
        "",
        quality_table(data["results"]),
        "",
    ]
    missing = data.get("missing") or []
    if missing:
        names = ", ".join(f"{m['task']} {m['method']} seed {m['seed']}" for m in missing)
        lines += [f"Not trained yet, so not in the table ({len(missing)} of the grid, `--no-train`): {names}.", ""]
    if plot_quality(data["results"], results_dir / f"{name}.png"):
        lines += [f"![{name}](benchmarks/{name}.png)", ""]
    return lines


def render(docs_dir: Path = DOCS) -> Path:
    """Write `docs_dir/benchmarks.md` from the JSON files in `docs_dir/benchmarks/`: a section per
    `step_cost*.json` (the untagged run first), then `end_to_end.json`, then each `quality*.json` (likewise), then
    `semi_supervised.json`."""
    results_dir = docs_dir / "benchmarks"
    end_to_end = _load(results_dir / "end_to_end.json")
    step_costs = sorted(results_dir.glob("step_cost*.json"), key=lambda p: (p.stem != "step_cost", p.stem))
    resolved = docs_dir.resolve()
    shown = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(docs_dir)
    rerender = "python -m benchmarks.report" + ("" if resolved == DOCS else f" --output-dir {shown}")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by the scripts in `benchmarks/` (`{rerender}` re-renders it from the JSON files "
        f"in `{shown}/benchmarks/`); do not edit by hand."
        + (
            " The classic implementations are in `benchmarks/classic.py`, written from the published algorithms as "
            "the snippets users copy."
            if step_costs
            else ""
        ),
        "",
    ]
    for path in step_costs:
        lines += step_cost_section(_load(path), results_dir, path.stem)
    if end_to_end is not None:
        config = end_to_end["config"]
        lines += [
            "## End to end",
            "",
            f"`Trainer.train()` for {config['steps']} optimizer steps (AdamW), model {_model_name(config['model'])}, "
            "batch "
            f"{config['batch_size']} x {config['seq_len']}, {config['rounds']} interleaved rounds; wall time of "
            "`train()` over the plain run of the same round.",
            "",
            f"Command: `{end_to_end['command']}`",
            "",
            f"Machine: {_machine(end_to_end['machine'])}",
            "",
            end_to_end_table(end_to_end),
            "",
        ]
    for path in sorted(results_dir.glob("quality*.json"), key=lambda p: (p.stem != "quality", p.stem)):
        lines += quality_section(_load(path), results_dir, cost_above=bool(step_costs), name=path.stem)
    semi = _load(results_dir / "semi_supervised.json")
    if semi is not None:
        from .semi_supervised import markdown

        lines += ["#" + markdown(semi), ""]  # its own page's title, one level down
    path = docs_dir / "benchmarks.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-render docs/benchmarks.md from the JSON results.")
    parser.add_argument("--output-dir", type=Path, default=DOCS)
    print(render(parser.parse_args().output_dir))
