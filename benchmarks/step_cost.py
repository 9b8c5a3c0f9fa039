"""Cost of one training step of each adversarial method, as a ratio to a plain `Trainer` step, and its extra memory.

Time: one process, one model shared by every trainer (a plain `Trainer`, an `AdversarialTrainer` per method, a
`ClassicTrainer` per classic snippet, and a "floor" trainer that runs the plain forward and backward twice). A step
is `trainer.training_step(model, batch)`: forward(s) and backward(s) of one batch, without the optimizer update (the
same for every method; `end_to_end.py` includes it). Gradients are set to None between steps, as `Trainer.train()`
does. Rounds are interleaved: every round runs each method once, in a shuffled order, so that load from other
processes falls on all methods alike; the first `--warmup` rounds are discarded. A method's ratio in a round is its
time over the plain step's time in the same round; the table gives the median over rounds and the spread
(quartiles, min-max), with two cross-checks: the ratio of the fastest runs, and the ratio of process CPU times.

Memory (skipped with `--no-memory`): each method runs in its own subprocess, which builds the model and the trainer,
resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs `--memory-steps` steps and reads the peak
(`VmHWM`). Two figures, each given over the plain step:
- peak RSS growth during the steps (what the OS sees; includes allocator caching and fragmentation);
- peak live tensor bytes during one step, from the CPU allocator's events recorded by `torch.profiler` with
  `profile_memory=True` (exact tensor bytes: backups, clones, bounds, extra activations and gradients).

On a machine shared with other processes, `--threads 1` gives far steadier times: with 2 OpenMP threads on 2 busy
cores every parallel region waits for a descheduled thread (see docs/benchmarks.md).

Run from the repository root:

    python -m benchmarks.step_cost --model minilm --rounds 11 --threads 1
    python -m benchmarks.step_cost --model tiny --rounds 2 --output-dir /tmp/bench   # smoke run

and write `docs/benchmarks/step_cost.json`, then regenerate `docs/benchmarks.md` (see `benchmarks/report.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import report
from .common import (
    DOCS,
    METHODS,
    MINILM,
    ROOT,
    TARGETS,
    build_trainer,
    command_line,
    count_parameters,
    load_model,
    machine_info,
    make_batch,
    parse_methods,
    summarize,
    write_json,
)

MB = 2**20


def prepare(trainer) -> None:
    """Let `training_step` run outside `train()`, which otherwise sets this attribute."""
    trainer.current_gradient_accumulation_steps = 1


def run_step(trainer, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall, CPU) seconds of one `training_step` on `batch`; gradients are set to None afterwards.

    CPU time is that of the whole process (all its threads): it does not grow while the process waits for a core
    taken by another process, so it is a cross-check of the wall time on a shared machine.
    """
    gc.collect()
    gc.disable()
    try:
        cpu, start = time.process_time(), time.perf_counter()
        trainer.training_step(trainer.model, dict(batch))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        gc.enable()
    trainer.model.zero_grad(set_to_none=True)
    return elapsed, cpu


def time_steps(
    model, batch: dict, methods: list[str], rounds: int, warmup: int, seed: int, log=print
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-method (wall, CPU) step times over `rounds` interleaved rounds, after `warmup` discarded rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: build_trainer(m, model, tmp) for m in methods}
        for trainer in trainers.values():
            prepare(trainer)
        rng = random.Random(seed)
        wall: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(warmup + rounds):
            order = list(methods)
            rng.shuffle(order)
            measured = {m: run_step(trainers[m], batch) for m in order}
            if r >= warmup:
                for m, (w, c) in measured.items():
                    wall[m].append(w)
                    cpu[m].append(c)
            label = f"round {r - warmup + 1}/{rounds}" if r >= warmup else f"warm-up {r + 1}/{warmup}"
            plain = measured["plain"][0]
            log(f"{label} ({plain:.2f} s plain): " + ", ".join(f"{m} {measured[m][0] / plain:.2f}x" for m in methods))
    return wall, cpu


# -- memory, one subprocess per method ---------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_tensor_bytes(fn) -> tuple[int, int]:
    """(peak, final) live tensor bytes allocated on the CPU while `fn()` runs, relative to its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def memory_child(args: argparse.Namespace) -> dict:
    """Run in a fresh process: peak RSS growth and peak live tensor bytes of `args.memory_child` steps."""
    method = args.memory_child
    model = load_model(args.model, seed=args.seed)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(method, model, tmp)
        prepare(trainer)
        gc.collect()
        resettable = _reset_peak_rss()
        base_kb = _status_kb("VmRSS")
        for _ in range(args.memory_steps):
            run_step(trainer, batch)
        peak_kb = _status_kb("VmHWM") if resettable else None
        gc.collect()
        peak, final = peak_tensor_bytes(lambda: trainer.training_step(trainer.model, dict(batch)))
        trainer.model.zero_grad(set_to_none=True)
    return {
        "method": method,
        "rss_base_mb": None if base_kb is None else base_kb / 1024,
        "rss_peak_growth_mb": None if peak_kb is None or base_kb is None else (peak_kb - base_kb) / 1024,
        "tensor_peak_mb": peak / MB,
        "tensor_after_step_mb": final / MB,
    }


def measure_memory(args: argparse.Namespace, methods: list[str], log=print) -> dict[str, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    results = {}
    for method in methods:
        command = [
            sys.executable,
            "-m",
            "benchmarks.step_cost",
            "--memory-child",
            method,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--memory-steps",
            str(args.memory_steps),
            "--seed",
            str(args.seed),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"memory {method}: {results[method]}")
    plain = results["plain"]
    for r in results.values():
        for key, extra in (("rss_peak_growth_mb", "extra_rss_mb"), ("tensor_peak_mb", "extra_tensor_mb")):
            r[extra] = None if r[key] is None or plain[key] is None else r[key] - plain[key]
    return results


# -- results -------------------------------------------------------------------------------------------------------
def summarize_times(times: dict[str, list[float]], cpu_times: dict[str, list[float]]) -> dict[str, dict]:
    plain, plain_cpu = times["plain"], cpu_times["plain"]
    results = {}
    for method, ts in times.items():
        kind, settings = METHODS[method]
        results[method] = {
            "kind": kind,
            "settings": settings,
            "seconds": summarize(ts),
            "ratio": summarize([t / p for t, p in zip(ts, plain)]),
            "ratio_of_medians": summarize(ts)["median"] / summarize(plain)["median"],
            # The fastest run of each is the least disturbed by other processes: a cross-check of the median.
            "ratio_of_minimums": min(ts) / min(plain),
            "cpu_seconds": summarize(cpu_times[method]),
            "cpu_ratio": summarize([c / p for c, p in zip(cpu_times[method], plain_cpu)]),
            "raw_seconds": ts,
            "raw_cpu_seconds": cpu_times[method],
        }
    for method, (target, classic) in TARGETS.items():
        if method not in results:
            continue
        r = results[method]
        check = {"target": target, "met_target": r["ratio"]["median"] <= target}
        # Paired by round (ours over the other in the same round), so that slow rounds cancel out.
        if classic in results:
            paired = [t / c for t, c in zip(times[method], times[classic])]
            check.update(classic=classic, vs_classic=summarize(paired), below_classic=summarize(paired)["median"] < 1)
        if "plain_x2" in results:
            check["vs_floor"] = summarize([t / f for t, f in zip(times[method], times["plain_x2"])])
        r["check"] = check
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MINILM, help="'minilm', 'tiny' or a path for from_pretrained")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before measuring")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--memory-methods", default=None, help="subset for the memory runs (default: --methods)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="where benchmarks.md and benchmarks/ go")
    parser.add_argument(
        "--tag", default="", help="name of an extra run: written to step_cost_<tag>.json, its own section of the page"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_child is not None:
        result = memory_child(args)
        print(json.dumps(result))
        return result

    def log(message: str) -> None:
        print(message, flush=True)

    methods = parse_methods(args.methods)
    info = machine_info()
    memory = None
    if not args.no_memory:
        memory = measure_memory(args, parse_methods(args.memory_methods or args.methods), log=log)

    model = load_model(args.model, seed=args.seed)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=args.seed)
    start = time.time()
    times, cpu_times = time_steps(model, batch, methods, args.rounds, args.warmup, args.seed, log=log)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = summarize_times(times, cpu_times)
    for method, r in (memory or {}).items():
        if method in results:
            results[method]["memory"] = r
    data = {
        "benchmark": "step_cost",
        "command": command_line("benchmarks.step_cost"),
        "config": {
            "model": args.model,
            "parameters": count_parameters(model),
            "vocab_size": model.config.vocab_size,
            "hidden_size": model.config.hidden_size,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "memory_steps": None if args.no_memory else args.memory_steps,
            "timing_seconds": round(time.time() - start, 1),
            "tag": args.tag,
        },
        "machine": info,
        "methods": results,
    }
    write_json(args.output_dir / "benchmarks" / (f"step_cost_{args.tag}.json" if args.tag else "step_cost.json"), data)
    report.render(args.output_dir)
    log(report.step_cost_table(data))
    return data


if __name__ == "__main__":
    main()
