"""Where the time of one training step goes, method by method.

1. The two kinds of backward the library relies on, on the same batch: a full `backward()` (parameter gradients)
   and `torch.autograd.grad` with respect to the embedding output only (PGD's inner steps, VAT's power iteration).
2. Phases of each method's step: the library's and the snippets' functions are wrapped at run time (here only, the
   library is not modified) with timers, so a step splits into forwards, backwards, attack set-up and restore.
3. With `--ops`, the `torch.profiler` table of one step per method (self CPU time by operator).

    python -m benchmarks.profile_step --model minilm --methods fgm,awp,vat,pgd --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from hf_adv import AWP, FGM, PGD, VAT
from hf_adv.trainer import AdversarialTrainer

from . import classic
from .common import MINILM, build_trainer, load_model, make_batch, parse_methods
from .step_cost import prepare, run_step

# Accumulated seconds per phase name while a step runs; filled by the wrappers below.
PHASES: dict[str, float] = defaultdict(float)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] += time.perf_counter() - start

    return wrapper


def _timed_context(name: str, fn):
    """Wrap a context-manager function: its set-up (`name`) and its exit (`name` + " restore") are timed apart."""

    @contextlib.contextmanager
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        manager = fn(*args, **kwargs)
        start = time.perf_counter()
        value = manager.__enter__()
        PHASES[name] += time.perf_counter() - start
        try:
            yield value
        except BaseException as error:
            if not manager.__exit__(type(error), error, error.__traceback__):
                raise
        else:
            start = time.perf_counter()
            manager.__exit__(None, None, None)
            PHASES[name + " restore"] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    """Time forwards, backwards and the attacks' own work. Nested phases are counted in both."""
    import accelerate
    import transformers

    accelerate.Accelerator.backward = _timed("backward", accelerate.Accelerator.backward)
    transformers.Trainer.compute_loss = _timed("forward (compute_loss)", transformers.Trainer.compute_loss)
    torch.autograd.grad = _timed("input-only backward (autograd.grad)", torch.autograd.grad)
    for cls in (FGM, PGD, AWP):
        cls.perturbed = _timed_context(f"{cls.name} perturb", cls.perturbed)
    VAT.adversarial_direction = _timed("vat power iteration (forward + autograd.grad)", VAT.adversarial_direction)
    VAT.loss = _timed("vat loss forward", VAT.loss)
    AdversarialTrainer.training_step = _timed("training_step", AdversarialTrainer.training_step)
    classic.ClassicTrainer.training_step = _timed("training_step", classic.ClassicTrainer.training_step)
    classic.RepeatedPassTrainer.training_step = _timed("training_step", classic.RepeatedPassTrainer.training_step)
    transformers.Trainer.training_step = _timed("training_step", transformers.Trainer.training_step)
    for name in ("save", "attack_step", "restore"):
        setattr(classic.ClassicAWP, name, _timed(f"classic awp {name}", getattr(classic.ClassicAWP, name)))
    for name in ("attack", "restore", "backup_grad", "restore_grad"):
        setattr(classic.ClassicPGD, name, _timed(f"classic pgd {name}", getattr(classic.ClassicPGD, name)))
    for name in ("attack", "restore"):
        setattr(classic.ClassicFGM, name, _timed(f"classic fgm {name}", getattr(classic.ClassicFGM, name)))


def phase_times(trainer, batch: dict, rounds: int) -> dict[str, float]:
    """Median seconds per phase over `rounds` steps (after one warm-up step)."""
    samples: dict[str, list[float]] = defaultdict(list)
    for r in range(rounds + 1):
        PHASES.clear()
        wall, _ = run_step(trainer, batch)
        if r > 0:
            samples["step (wall)"].append(wall)
            for name, seconds in PHASES.items():
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def backward_costs(model, batch: dict, rounds: int) -> dict[str, float]:
    """Median seconds of forward, full backward, and input-only backward (`autograd.grad` w.r.t. the embedding
    output), each on a fresh forward."""
    model.train()
    embedding = model.get_input_embeddings()
    captured = {}

    def keep(module, args, output):
        captured["out"] = output
        return output

    handle = embedding.register_forward_hook(keep)
    times: dict[str, list[float]] = {"forward": [], "full_backward": [], "input_only_backward": []}
    try:
        for r in range(rounds + 1):
            for kind in ("full_backward", "input_only_backward"):
                gc.collect()
                start = time.perf_counter()
                loss = model(**batch).loss
                middle = time.perf_counter()
                if kind == "full_backward":
                    loss.backward()
                else:
                    torch.autograd.grad(loss, captured["out"])
                end = time.perf_counter()
                model.zero_grad(set_to_none=True)
                if r > 0:
                    times["forward"].append(middle - start)
                    times[kind].append(end - middle)
    finally:
        handle.remove()
    return {k: statistics.median(v) for k, v in times.items()}


def profile_method(trainer, batch: dict, row_limit: int) -> str:
    run_step(trainer, batch)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("training_step"):
            trainer.training_step(trainer.model, dict(batch))
    trainer.model.zero_grad(set_to_none=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--methods", default="awp,vat,pgd")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the backward comparison")
    parser.add_argument("--row-limit", type=int, default=25)
    parser.add_argument("--ops", action="store_true", help="also print a torch.profiler table per method")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len)
    costs = backward_costs(model, batch, args.rounds)
    print(
        f"forward {costs['forward']:.3f} s, full backward {costs['full_backward']:.3f} s, input-only backward "
        f"{costs['input_only_backward']:.3f} s ({costs['input_only_backward'] / costs['full_backward']:.2f} of full)"
    )
    plain_step = costs["forward"] + costs["full_backward"]
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        methods = parse_methods(args.methods)
        trainers = {m: build_trainer(m, model, tmp) for m in methods}
        for trainer in trainers.values():
            prepare(trainer)
        for method, trainer in trainers.items():
            phases = phase_times(trainer, batch, args.rounds)
            print(f"\n=== {method}: phases, median seconds (x forward+full backward = {plain_step:.3f} s) ===")
            for name, seconds in sorted(phases.items(), key=lambda item: -item[1]):
                print(f"  {name:<50} {seconds:8.3f} s  {seconds / plain_step:5.2f}x")
        if args.ops:
            for method, trainer in trainers.items():
                print(f"\n=== {method}: operators ===")
                print(profile_method(trainer, batch, args.row_limit))


if __name__ == "__main__":
    main()
