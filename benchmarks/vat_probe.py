"""What VAT's probe size `xi` and its number of power iterations do to the direction it finds, on a trained model.

VAT (Miyato et al., TPAMI 2018) finds r_adv by power iteration: a random direction d scaled to `xi` per example, the
gradient of D(p(x) || p(x + d)) with respect to d as the next d, and after `iterations` rounds r_adv = epsilon *
d / ||d||. Power iteration proper needs a small `xi` (the finite-difference step of a Hessian-vector product); the
widely used PyTorch port, and `hf_adv`'s default, take `xi = 10` with one iteration. On the output of a BERT-family
embedding an IMDB review of 128 tokens has an L2 norm of about 12.5, so a probe of 10 is most of the input.

For each (xi, iterations) this runs `hf_adv.methods.vat.VAT.adversarial_direction` (the trainer's own code, same
random start) on real IMDB test reviews, in eval mode (no dropout, so only xi and the iterations differ), and reports

- `lds`: D(p(x) || p(x + r_adv)) at `--epsilon`, the divergence VAT trains on (larger = a more adversarial r_adv);
- `cosine`: the per-example cosine between r_adv and that of the smallest probe with the most iterations, the closest
  to the true power-iteration direction (the dominant eigenvector of the divergence's Hessian).

It also records the scale both compare with: percentiles of an example's embedding-output norm on IMDB and
GoEmotions. The settings that power iteration would lose warn (that warning is the finding measured here).

    python -m benchmarks.vat_probe --model runs/quality/imdb/none/seed0     # a trained IMDB model

Writes `docs/benchmarks/vat_probe.json`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import AutoTokenizer

from hf_adv.losses import divergence, lookup_masks
from hf_adv.methods.vat import VAT

from .common import DOCS, ROOT, load_model, record_measurement, resolve_model_path

DATA = ROOT.parent / "shared" / "data"
MODULE = "benchmarks.vat_probe"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model, seed=args.seed)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model_path(args.model))
    reviews = pd.read_csv(args.data_dir / "imdb" / "test.csv.gz").sample(args.examples, random_state=args.seed)
    enc = tokenizer(list(reviews.text), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    distance = divergence("kl")
    settings = [(xi, it) for xi in args.xis for it in args.iterations]
    reference = (min(args.xis), max(args.iterations))
    directions, lds = {}, {}
    for xi, iterations in settings:
        vat = VAT(model, epsilon=args.epsilon, xi=xi, iterations=iterations)
        try:
            with vat.tap.attached():
                with torch.no_grad():
                    clean = model(**inputs).logits
                shapes = list(vat.tap.shapes)
                torch.manual_seed(args.seed)  # the same random start for every setting
                forward = lambda: model(**inputs).logits  # noqa: E731
                r_adv = vat.adversarial_direction(forward, clean, shapes, distance, masks=lookup_masks(inputs, shapes))
                if r_adv is None:
                    directions[(xi, iterations)], lds[(xi, iterations)] = None, float("nan")
                    continue
                with torch.no_grad():
                    lds[(xi, iterations)] = float(vat.loss(forward, clean, r_adv, distance))
                directions[(xi, iterations)] = r_adv[0].flatten(1) / args.epsilon
        finally:
            vat.tap.detach()
    rows = []
    for xi, iterations in settings:
        direction, ref = directions[(xi, iterations)], directions[reference]
        cosine = (direction * ref).sum(1).tolist() if direction is not None and ref is not None else []
        rows.append(
            {
                "xi": xi,
                "iterations": iterations,
                "lds": lds[(xi, iterations)],
                "cosine_median": statistics.median(cosine) if cosine else None,
                "cosine": cosine,
            }
        )
    return {
        "reference": {"xi": reference[0], "iterations": reference[1]},
        "embedding_norms": embedding_norms(model, tokenizer, args),
        "results": rows,
    }


def embedding_norms(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """The scale xi and epsilon compare with: percentiles of the L2 norm of an example's embedding output over its
    real tokens, on `--norm-examples` training rows of IMDB (at `--max-length` tokens) and, where its files are
    there, of GoEmotions (at 50 tokens, the GoEmotions config's)."""
    tables = {"imdb": (lambda: pd.read_csv(args.data_dir / "imdb" / "train.csv.gz").text, args.max_length)}
    goemotions = args.data_dir / "goemotions" / "train.tsv"
    if goemotions.is_file():
        tables["goemotions"] = (lambda: pd.read_csv(goemotions, sep="\t", header=None, quoting=3)[0], 50)
    found = {}
    for name, (read, length) in tables.items():
        texts = read()
        texts = list(texts.sample(min(args.norm_examples, len(texts)), random_state=args.seed))
        enc = tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.get_input_embeddings()(enc.input_ids) * enc.attention_mask.unsqueeze(-1)
        norms = output.flatten(1).norm(dim=1)
        quantiles = torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95])).tolist()
        found[name] = {"max_length": length, "examples": len(texts), **dict(zip(("p05", "median", "p95"), quantiles))}
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m " + MODULE,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a trained IMDB classifier (a run folder), or `minilm` for an untrained head"
    )
    parser.add_argument("--tokenizer", default=None, help="default: the model's")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="the folder with imdb/ (and goemotions/) in it")
    parser.add_argument("--examples", type=int, default=32, help="IMDB test reviews, attacked as one batch")
    parser.add_argument("--xis", type=float, nargs="+", default=[0.01, 0.1, 0.3, 0.5, 1.0, 10.0], help="probe sizes")
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2], help="power-iteration counts")
    parser.add_argument("--epsilon", type=float, default=1.0, help="VAT's epsilon (imdb_vat.yaml's)")
    parser.add_argument("--max-length", type=int, default=128, help="IMDB tokens")
    parser.add_argument("--norm-examples", type=int, default=1000, help="training rows per task for the norms")
    parser.add_argument("--seed", type=int, default=0, help="the reviews drawn and VAT's random start")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="docs folder: writes benchmarks/vat_probe.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not (args.data_dir / "imdb" / "test.csv.gz").is_file():
        raise SystemExit(f"{args.data_dir}/imdb/test.csv.gz is missing; see ../shared/data/README.md (or --data-dir).")
    result = record_measurement(MODULE, argv, args, measure, "vat_probe")
    for task, norms in result["embedding_norms"].items():
        print(
            f"{task}: embedding-output norm per example over real tokens, 5th / 50th / 95th percentile: "
            f"{norms['p05']:.1f} / {norms['median']:.1f} / {norms['p95']:.1f}"
        )
    for row in result["results"]:
        cosine = "n/a" if row["cosine_median"] is None else f"{row['cosine_median']:.2f}"
        print(f"xi {row['xi']:g}, {row['iterations']} iteration(s): LDS {row['lds']:.3g}, cosine {cosine}")
    return result


if __name__ == "__main__":
    main()
