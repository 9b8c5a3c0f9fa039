"""Wall time of `Trainer.train()` over a fixed number of optimizer steps, for each method, as a ratio to plain.

Each run trains a fresh copy of the same model (deep copy of one loaded model) on the same random dataset of
`--steps` x `--batch-size` examples, with AdamW (the `Trainer` default), for exactly `--steps` steps, one epoch
at most; the time is the wall time of `trainer.train()` alone (optimizer, scheduler, data loading and logging
included; building the trainer excluded). Rounds are interleaved as in `step_cost.py`: every round trains each
method once in a shuffled order; a warm-up `train()` of the plain trainer runs first and is discarded.

Run from the repository root:

    python -m benchmarks.end_to_end --model minilm --steps 10 --rounds 3
    python -m benchmarks.end_to_end --model tiny --steps 2 --rounds 1 --output-dir /tmp/bench   # smoke run

and write `docs/benchmarks/end_to_end.json`, then regenerate `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset

from . import report
from .common import (
    DOCS,
    METHODS,
    MINILM,
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


def make_dataset(vocab_size: int, examples: int, seq_len: int, seed: int) -> Dataset:
    batch = make_batch(vocab_size, examples, seq_len, seed=seed)
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def train_seconds(method: str, base_model, dataset: Dataset, args: argparse.Namespace) -> float:
    model = copy.deepcopy(base_model)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            method,
            model,
            tmp,
            train_dataset=dataset,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            logging_steps=args.steps,
            seed=args.seed,
        )
        gc.collect()
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MINILM, help="'minilm', 'tiny' or a path for from_pretrained")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per train() run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="where benchmarks.md and benchmarks/ go")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    methods = parse_methods(args.methods)
    info = machine_info()
    base_model = load_model(args.model, seed=args.seed)
    dataset = make_dataset(base_model.config.vocab_size, args.steps * args.batch_size, args.seq_len, args.seed)
    start = time.time()
    train_seconds("plain", base_model, dataset, args)  # warm-up: first-call costs of the optimizer and loader
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = list(methods)
        rng.shuffle(order)
        for method in order:
            times[method].append(train_seconds(method, base_model, dataset, args))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{m} {times[m][-1]:.1f}s ({times[m][-1] / times['plain'][-1]:.2f}x)" for m in methods),
            flush=True,
        )
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {}
    for method, ts in times.items():
        results[method] = {
            "kind": METHODS[method][0],
            "settings": METHODS[method][1],
            "seconds": summarize(ts),
            "ratio": summarize([t / p for t, p in zip(ts, times["plain"])]),
            "raw_seconds": ts,
        }
    data = {
        "benchmark": "end_to_end",
        "command": command_line("benchmarks.end_to_end"),
        "config": {
            "model": args.model,
            "parameters": count_parameters(base_model),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "rounds": args.rounds,
            "timing_seconds": round(time.time() - start, 1),
        },
        "machine": info,
        "methods": results,
    }
    write_json(args.output_dir / "benchmarks" / "end_to_end.json", data)
    report.render(args.output_dir)
    print(report.end_to_end_table(data), flush=True)
    return data


if __name__ == "__main__":
    main()
