"""Why FGM on a fraction of the rows costs clean accuracy: the size and direction of its adversarial gradient.

FGM on a quarter of a batch (`--adv_fraction 0.25`) trains on the adversarial loss of 4 random rows of 16, averaged
over those 4: an unbiased estimate of FGM's loss on all 16, but a noisier one. This measures, on real IMDB batches at
the start of fine-tuning (the pretrained model, a new head), the L2 norm of the parameter gradient of

- the clean loss on the 16 rows,
- FGM's adversarial loss on the 16 rows,
- the adversarial loss on a random `--fraction` of them (several draws per batch),

and the cosine between each adversarial gradient and the clean one. The perturbation is FGM's in example scope:
`--epsilon` times the clean loss's gradient with respect to the embedding output, L2-normalised per example over its
real tokens, so each row gets the same perturbation in both adversarial losses. With gradient clipping (the recipes
clip at norm 1.0) a larger, less aligned term takes a larger share of every update.

    python -m benchmarks.fraction_gradients                        # MiniLM, 4 batches of 16 IMDB reviews, 128 tokens

Writes `docs/benchmarks/fraction_gradients.json` (medians and every value).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from hf_adv.methods.fgm import example_directions

from .common import DOCS, MINILM, ROOT, load_model, record_measurement, resolve_model_path

DATA = ROOT.parent / "shared" / "data"
MODULE = "benchmarks.fraction_gradients"


def flat_gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of `loss` with respect to `params`, flattened into one vector (zeros where it does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = load_model(args.model, seed=args.seed)
    model.train()  # dropout on, as in training
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model_path(args.model))
    reviews = pd.read_csv(args.data_dir / "imdb" / "train.csv.gz").sample(
        args.batches * args.batch_size, random_state=args.seed
    )
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = model.get_input_embeddings()
    rows = args.batch_size
    count = max(1, round(args.fraction * rows))
    values: dict[str, list[float]] = {k: [] for k in ("clean", "adversarial_all", "adversarial_fraction")}
    cosines: dict[str, list[float]] = {"adversarial_all": [], "adversarial_fraction": []}
    for b in range(args.batches):
        batch = reviews.iloc[b * rows : (b + 1) * rows]
        enc = tokenizer(
            list(batch.text), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
        )
        labels = torch.tensor(batch.label.values)
        output = embeddings(enc.input_ids).detach().requires_grad_(True)
        clean = F.cross_entropy(model(inputs_embeds=output, attention_mask=enc.attention_mask).logits, labels)
        clean_grad = flat_gradient(clean, params + [output])
        gradient = clean_grad[-output.numel() :].view_as(output)
        clean_grad = clean_grad[: -output.numel()]
        (direction,), _ = example_directions([gradient], [enc.attention_mask])  # FGM's own, as in training
        delta = args.epsilon * direction
        perturbed = output.detach() + delta

        def adversarial(index: torch.Tensor, perturbed=perturbed, mask=enc.attention_mask, labels=labels):
            logits = model(inputs_embeds=perturbed[index], attention_mask=mask[index]).logits
            return flat_gradient(F.cross_entropy(logits, labels[index]), params)

        every = adversarial(torch.arange(rows))
        values["clean"].append(clean_grad.norm().item())
        values["adversarial_all"].append(every.norm().item())
        cosines["adversarial_all"].append(F.cosine_similarity(clean_grad, every, dim=0).item())
        for _ in range(args.draws):
            part = adversarial(torch.randperm(rows)[:count].sort().values)
            values["adversarial_fraction"].append(part.norm().item())
            cosines["adversarial_fraction"].append(F.cosine_similarity(clean_grad, part, dim=0).item())
    return {
        "gradient_norm": {k: {"median": statistics.median(v), "values": v} for k, v in values.items()},
        "cosine_with_clean": {k: {"median": statistics.median(v), "values": v} for k, v in cosines.items()},
        "rows": {"all": rows, "fraction": count},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MINILM, help="`minilm` (the installed all-MiniLM-L6-v2) or a model path")
    parser.add_argument("--tokenizer", default=None, help="default: the model's")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="holds imdb/train.csv.gz as ../shared/data")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--draws", type=int, default=3, help="random subsets per batch")
    parser.add_argument("--epsilon", type=float, default=0.25, help="FGM's example-scope L2 radius")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output-dir", type=Path, default=DOCS, help="docs folder: benchmarks/fraction_gradients.json"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not (args.data_dir / "imdb" / "train.csv.gz").is_file():
        raise SystemExit(
            f"{args.data_dir}/imdb/train.csv.gz is missing; see ../shared/data/README.md (or --data-dir)."
        )
    result = record_measurement(MODULE, argv, args, measure, "fraction_gradients")
    norm, cos = result["gradient_norm"], result["cosine_with_clean"]
    print(
        f"gradient norm (median): clean {norm['clean']['median']:.3f}, adversarial on all {args.batch_size} rows "
        f"{norm['adversarial_all']['median']:.3f}, on {result['rows']['fraction']} rows "
        f"{norm['adversarial_fraction']['median']:.3f}; cosine with the clean gradient: all "
        f"{cos['adversarial_all']['median']:.2f}, fraction {cos['adversarial_fraction']['median']:.2f}"
    )
    return result


if __name__ == "__main__":
    main()
