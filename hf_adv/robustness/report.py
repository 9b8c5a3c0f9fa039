"""Report out: the Markdown table, the plot and the JSON of `{model name: metrics}`."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .core import epsilon_key

logger = logging.getLogger(__name__)


def _epsilon_series(metrics: dict[str, Any], attack: str) -> list[tuple[float, float]]:
    prefix = f"{attack}_accuracy@"
    points = [(float(k[len(prefix) :]), v) for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(points)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model: clean, FGM and PGD at each epsilon, minimal perturbation, word attack (percentages)."""
    names = list(results)
    metric_name = _metric_name(results)
    epsilons = {a: sorted({e for r in results.values() for e, _ in _epsilon_series(r, a)}) for a in ("fgm", "pgd")}
    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("model", lambda r: r["_name"]),
        (f"clean {metric_name}", lambda r: _percent(r.get("clean_accuracy"))),
    ]
    for attack in ("fgm", "pgd"):
        label = "FGM" if attack == "fgm" else f"PGD-{_steps(results)}"
        for e in epsilons[attack]:
            key = f"{attack}_accuracy@{epsilon_key(e)}"
            columns.append((f"{label} eps {epsilon_key(e)}", lambda r, key=key: _percent(r.get(key))))
    has_minimal = any("min_perturbation_mean" in r for r in results.values())
    has_word = any("word_attack_success_rate" in r for r in results.values())
    if has_minimal:
        columns += [
            ("min. perturbation mean", lambda r: _number(r.get("min_perturbation_mean"))),
            ("median", lambda r: _number(r.get("min_perturbation_median"))),
            ("unflipped", lambda r: _percent(r.get("min_perturbation_unflipped"))),
        ]
    if has_word:
        columns += [
            ("word attack success", lambda r: _percent(r.get("word_attack_success_rate"))),
            (f"{metric_name} under word attack", lambda r: _percent(r.get("word_attack_accuracy"))),
            ("tokens changed", lambda r: _percent(r.get("word_attack_fraction_changed"))),
        ]
    lines = [
        "| " + " | ".join(c for c, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for name in names:
        row = {**results[name], "_name": name}
        lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
    lines.append("")
    lines.append(_units(metric_name, has_minimal, has_word))
    return "\n".join(lines) + "\n"


def _units(metric_name: str, has_minimal: bool, has_word: bool) -> str:
    """The table's footnote: the units of the columns it has."""
    percent = metric_name[0].upper() + metric_name[1:] + (", success rates and tokens changed" if has_word else "")
    norms = "epsilon and minimal perturbation" if has_minimal else "epsilon"
    return f"{percent} in %; {norms} in L2 norm per example of the input embedding output."


def _steps(results: dict[str, dict[str, Any]]) -> str:
    steps = {r.get("pgd_steps", r.get("settings", {}).get("pgd_steps")) for r in results.values()} - {None}
    return str(steps.pop()) if len(steps) == 1 else "K"


def _percent(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _plot_title(results: dict[str, dict[str, Any]], metric_name: str) -> str:
    """The plot's title, naming only the attacks it shows."""
    shown = {a for metrics in results.values() for a in ("pgd", "fgm") if _epsilon_series(metrics, a)}
    parts = [f"PGD-{_steps(results)} (solid)"] if "pgd" in shown else []
    parts += ["FGM (dashed)"] if "fgm" in shown else []
    return f"{metric_name} under " + " and ".join(parts) if parts else f"clean {metric_name}"


def _model_and_loss(name: str, metrics: dict[str, Any]) -> tuple[str, str]:
    """(the model, the attack loss) of a row: `evaluate` records the loss, and the CLI names a row evaluated under
    several losses 'model (loss attack)'."""
    loss = metrics.get("attack_loss") or "ce"
    suffix = f" ({loss} attack)"
    return (name[: -len(suffix)] if name.endswith(suffix) else name), loss


def plot_accuracy(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (micro-F1 for multi-label models) against epsilon, with the clean score at epsilon 0: the colour
    names the model, the line style the attack (PGD solid with dots, FGM dashed), each in its own legend; the rows
    of one model under several attack losses share its colour, the margin attack's faded with hollow markers.

    Raises:
        `ImportError`: without matplotlib (`pip install "hf-adv[plots]"`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metric_name = _metric_name(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors: dict[str, str] = {}
    models, attacks, losses = [], {}, set()
    for name, metrics in results.items():
        model, loss = _model_and_loss(name, metrics)
        color = colors.setdefault(model, f"C{len(colors) % 10}")
        clean = metrics.get("clean_accuracy")
        shown = False
        for attack, (style, marker, label) in _ATTACK_STYLES.items():
            points = _epsilon_series(metrics, attack)
            if not points:
                continue
            if clean is not None:
                points = [(0.0, clean), *points]
            xs, ys = zip(*points)
            faded = {"alpha": 0.55, "markerfacecolor": "white"} if loss != "ce" else {}
            ax.plot(xs, [100 * y for y in ys], style, color=color, marker=marker, **faded)
            shown = True
            losses.add(loss)
            attacks[attack] = label.replace("K", _steps(results)) if attack == "pgd" else label
        if shown and model not in [handle.get_label() for handle in models]:
            models.append(Line2D([], [], color=color, linewidth=6, label=model))
    ax.set_xlabel("epsilon (L2 per example, input embedding output)")
    ax.set_ylabel(f"{metric_name} under attack (%)")
    ax.set_title(_plot_title(results, metric_name))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if models:
        model_legend = ax.legend(handles=models, title="model (colour)", fontsize="small", loc="lower left")
        ax.add_artist(model_legend)
        styles = [
            Line2D([], [], color="0.3", linestyle=_ATTACK_STYLES[a][0], marker=_ATTACK_STYLES[a][1], label=label)
            for a, label in attacks.items()
        ]
        if len(losses) > 1:
            styles += [
                Line2D([], [], color="0.3", marker="o", label="cross-entropy loss"),
                Line2D([], [], color="0.3", marker="o", alpha=0.55, markerfacecolor="white", label="margin loss"),
            ]
        ax.legend(handles=styles, title="attack (line)", fontsize="small", loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


_ATTACK_STYLES = {"pgd": ("-", "o", "PGD-K"), "fgm": ("--", None, "FGM")}
_warned_no_plot = False


def _metric_name(results: dict[str, dict[str, Any]]) -> str:
    return "micro-F1" if any(r.get("metric") == "f1_micro" for r in results.values()) else "accuracy"


def write_report(
    results: dict[str, dict[str, Any]], output_dir: str | Path, stem: str = "robustness"
) -> dict[str, Path]:
    """Write `{stem}.json`, `{stem}.md` and `{stem}.png` for `{model name: metrics}`. Without matplotlib (the
    `plots` extra: `pip install "hf-adv[plots]"`) the plot is left out, and a warning says so once per process.

    Returns:
        `dict[str, Path]`: the paths written, by kind: `json`, `markdown` and (with matplotlib) `plot`.
    """
    global _warned_no_plot
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps({"models": results}, indent=2, allow_nan=True) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    try:
        paths["plot"] = plot_accuracy(results, output_dir / f"{stem}.png")
    except ImportError:
        if not _warned_no_plot:
            _warned_no_plot = True
            logger.warning(
                "matplotlib is not installed: %s.png is not written (the table and JSON are). Install the plots "
                'extra for it: pip install "hf-adv[plots]".',
                stem,
            )
    return paths


def read_results(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Merge the `models` of several JSON reports (later files win on a name clash).

    Raises:
        `ValueError`: naming the file, for a missing file or one that is not a report this module wrote.
    """
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--results {path}: no such file (a robustness.json written by an earlier run).")
        try:
            report = json.loads(path.read_text())
            models = report["models"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"--results {path}: not a robustness report (expected the JSON with a 'models' mapping that "
                f"write_report writes): {type(error).__name__}: {error}"
            ) from error
        results.update(models)
    return results
