"""Straightforward reference implementations, written from the published algorithms as the classic snippets do
(whole-matrix clones, `.grad` reads, gradient backups). The library's methods must give the same gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _loss(model, batch):
    return model(**batch).loss


def clean(model, batch, scale=1.0):
    model.zero_grad()
    loss = _loss(model, batch)
    (loss * scale).backward()
    return loss


def fgm(model, batch, epsilon, sign=False):
    emb = model.get_input_embeddings().weight
    clean(model, batch)
    backup = emb.data.clone()
    g = emb.grad
    norm = torch.norm(g)
    r = epsilon * g.sign() if sign else epsilon * g / norm
    emb.data.add_(r)
    _loss(model, batch).backward()
    emb.data = backup


def pgd(model, batch, epsilon, alpha, steps):
    emb = model.get_input_embeddings().weight
    clean(model, batch)
    emb_backup = emb.data.clone()
    grad_backup = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for t in range(steps):
        g = emb.grad
        norm = torch.norm(g)
        emb.data.add_(alpha * g / norm)
        r = emb.data - emb_backup
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        emb.data = emb_backup + r
        if t != steps - 1:
            model.zero_grad()
        else:
            for n, p in model.named_parameters():
                if n in grad_backup:
                    p.grad = grad_backup[n]
        _loss(model, batch).backward()
    emb.data = emb_backup


def awp(model, batch, lr, eps, discard_clean_grad=False):
    clean(model, batch)
    backup = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None and p.dim() >= 2:
            backup[n] = p.data.clone()
            gn = torch.norm(p.grad)
            if gn != 0 and not torch.isnan(gn):
                r = lr * p.grad / gn * torch.norm(p.data)
                p.data.add_(r)
                lo, hi = backup[n] - eps * backup[n].abs(), backup[n] + eps * backup[n].abs()
                p.data = torch.min(torch.max(p.data, lo), hi)
    if discard_clean_grad:
        model.zero_grad()
    _loss(model, batch).backward()
    for n, p in model.named_parameters():
        if n in backup:
            p.data = backup[n]


def _kl(p_logits, q_logits, multi_label):
    if multi_label:
        p = torch.sigmoid(p_logits)
        q = torch.sigmoid(q_logits)
        # Averaged over labels, as the multi-label BCE loss is.
        return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean(-1).mean()
    return F.kl_div(F.log_softmax(q_logits, -1), F.softmax(p_logits, -1), reduction="batchmean")


def vat_term(model, batch, noise, epsilon, xi, iterations, multi_label=False):
    """LDS as in Miyato et al.'s reference code: the probe gradient taken with a full backward then discarded."""
    module = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        clean_logits = model(**inputs).logits
    state = {"delta": None}
    handle = module.register_forward_hook(lambda m, a, out: out + state["delta"])
    try:
        d = noise.clone()
        if "attention_mask" in batch:  # no random start on padding (Miyato et al.'s `_mask_by_length`)
            d = d * batch["attention_mask"].unsqueeze(-1)
        for _ in range(iterations):
            d = xi * d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
            d.requires_grad_(True)
            state["delta"] = d
            dist = _kl(clean_logits, model(**inputs).logits, multi_label)
            dist.backward()
            d = d.grad.detach()
            model.zero_grad()
        r_adv = epsilon * d / d.flatten(1).norm(dim=1).view(-1, 1, 1)
        state["delta"] = r_adv
        return _kl(clean_logits, model(**inputs).logits, multi_label)
    finally:
        handle.remove()


# -- example scope, FreeLB, carried FGM, R-Drop -----------------------------------------------------------------------


class _Shift:
    """A forward hook on the input embedding that adds `delta` to its output and keeps the output for its gradient."""

    def __init__(self, model):
        self.delta = None
        self.output = None
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.delta is not None:
            out = out + self.delta
        out.retain_grad()
        self.output = out
        return out

    def remove(self):
        self.handle.remove()


def _per_example_unit(g, mask):
    g = g * mask.unsqueeze(-1)
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def fgm_example(model, batch, epsilon, sign=False, fraction=1.0):
    """FGM with one perturbation per position, epsilon per example over its real tokens (Miyato et al. 2017); with
    `fraction < 1` the adversarial pass runs on `torch.randperm`'s first rows (Kurakin et al. 2017)."""
    shift = _Shift(model)
    try:
        clean(model, batch)
        g = shift.output.grad.detach()
        mask = batch["attention_mask"].float()
        rows = batch["input_ids"].shape[0]
        index = torch.arange(rows)
        if fraction < 1:
            index = torch.randperm(rows)[: max(1, round(fraction * rows))].sort().values
        unit = _per_example_unit(g[index], mask[index])
        shift.delta = epsilon * unit.sign() if sign else epsilon * unit
        _loss(model, {k: v[index] for k, v in batch.items()}).backward()
    finally:
        shift.remove()


def fgm_fraction(model, batch, epsilon, fraction):
    """Token-scope FGM whose adversarial pass runs on `torch.randperm`'s first rows, r built from those rows' clean
    gradient only (scattered onto the vocabulary rows they look up, padding row skipped), written into the weight."""
    shift = _Shift(model)
    try:
        clean(model, batch)
        out_grad = shift.output.grad.detach()
    finally:
        shift.remove()
    rows = batch["input_ids"].shape[0]
    index = torch.randperm(rows)[: max(1, round(fraction * rows))].sort().values
    emb = model.get_input_embeddings()
    ids = batch["input_ids"][index]
    g = torch.zeros_like(emb.weight).index_add_(0, ids.reshape(-1), out_grad[index].reshape(-1, emb.weight.shape[1]))
    if emb.padding_idx is not None:
        g[emb.padding_idx] = 0
    backup = emb.weight.data.clone()
    emb.weight.data.add_(epsilon * g / g.norm())
    _loss(model, {k: v[index] for k, v in batch.items()}).backward()
    emb.weight.data = backup


def pgd_example(model, batch, epsilon, alpha, steps):
    """PGD with a per-example L2 ball over the real tokens, as the trainer's example scope."""
    shift = _Shift(model)
    try:
        clean(model, batch)
        mask = batch["attention_mask"].float()
        grad_backup = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        g = shift.output.grad.detach()
        delta = torch.zeros_like(g)
        for t in range(steps):
            delta = delta + alpha * _per_example_unit(g, mask)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = torch.where(norms > epsilon, epsilon * delta / norms, delta)
            shift.delta = delta
            if t != steps - 1:
                model.zero_grad()
                _loss(model, batch).backward()
                g = shift.output.grad.detach()
        for n, p in model.named_parameters():
            p.grad = grad_backup.get(n)
        _loss(model, batch).backward()
    finally:
        shift.remove()


def freelb(model, batch, alpha, steps, init_mag=0.0, max_norm=0.0, clean_loss=False):
    """FreeLB as in the authors' run_glue_freelb.py (L2 norm type), on the embedding output."""
    model.zero_grad()
    if clean_loss:
        _loss(model, batch).backward()
    emb = model.get_input_embeddings()
    mask = batch["attention_mask"].float()
    rows, length = batch["input_ids"].shape
    hidden = emb.weight.shape[1]
    delta = torch.zeros(rows, length, hidden)
    if init_mag > 0:
        delta = delta.uniform_(-1, 1) * mask.unsqueeze(2)
        delta = delta * (init_mag / torch.sqrt(mask.sum(1) * hidden)).view(-1, 1, 1)
    for k in range(steps):
        delta.requires_grad_()
        handle = emb.register_forward_hook(lambda m, a, out, d=delta: out + d)
        (_loss(model, batch) / steps).backward()
        handle.remove()
        if k == steps - 1:
            break
        g = delta.grad.detach()
        denorm = g.view(rows, -1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)
        delta = (delta + alpha * g / denorm).detach()
        if max_norm > 0:
            norms = delta.view(rows, -1).norm(dim=1)
            reweights = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)).view(-1, 1, 1)
            delta = (delta * reweights).detach()


def carry(model, batch, epsilon, steps=2):
    """Carried FGM over `steps` steps on the same batch: each step trains at the offsets the previous one left on the
    vocabulary rows (written into the weight, as the classic snippet perturbs it); the last step's gradients stay."""
    emb = model.get_input_embeddings().weight
    offsets = torch.zeros_like(emb)
    for _ in range(steps):
        model.zero_grad()
        backup = emb.data.clone()
        emb.data.add_(offsets)
        _loss(model, batch).backward()
        emb.data = backup
        rows = batch["input_ids"].unique()
        offsets[rows] = epsilon * emb.grad[rows] / emb.grad.norm()


def rdrop(model, batch, weight, kind="kl"):
    """R-Drop as in the authors' README: two forwards (two dropout masks), both losses, the symmetric KL. `kind`:
    `bernoulli` for multi-label (per-label Bernoulli KL, averaged over labels as the BCE is), `mse` for regression."""
    model.zero_grad()
    first, second = model(**batch), model(**batch)
    p, q = first.logits, second.logits
    if kind == "kl":
        kl = 0.5 * (
            F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean")
            + F.kl_div(F.log_softmax(p, -1), F.softmax(q, -1), reduction="batchmean")
        )
    elif kind == "bernoulli":

        def bernoulli(a, b):  # KL(Bernoulli(sigmoid(a)) || Bernoulli(sigmoid(b))), per label
            pa, pb = torch.sigmoid(a), torch.sigmoid(b)
            return pa * (torch.log(pa) - torch.log(pb)) + (1 - pa) * (torch.log(1 - pa) - torch.log(1 - pb))

        kl = 0.5 * (bernoulli(p, q) + bernoulli(q, p)).mean()
    else:
        kl = (p - q).square().mean()
    (first.loss + second.loss + weight * kl).backward()


def awp_rdrop(model, batch, lr, eps, weight):
    """AWP with R-Drop: the clean pass's graph is kept while AWP moves the weights (out of place here, so the graph
    keeps the weights it was computed with), then R-Drop's second pass differentiates through both passes."""
    model.zero_grad()
    first = model(**batch)
    first.loss.backward(retain_graph=True)
    backup = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None and p.dim() >= 2:
            backup[n] = p.data
            gn = torch.norm(p.grad)
            if gn != 0 and not torch.isnan(gn):
                moved = p.data + lr * p.grad / gn * torch.norm(p.data)
                p.data = torch.min(torch.max(moved, p.data - eps * p.data.abs()), p.data + eps * p.data.abs())
    _loss(model, batch).backward()
    for n, p in model.named_parameters():
        if n in backup:
            p.data = backup[n]
    second = model(**batch)
    p, q = first.logits, second.logits
    kl = 0.5 * (
        F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean")
        + F.kl_div(F.log_softmax(p, -1), F.softmax(q, -1), reduction="batchmean")
    )
    (second.loss + weight * kl).backward()


def vat(model, batch, weight, epsilon=1.0, xi=10.0, iterations=1):
    """Clean loss + weight * LDS, with the random start of the `deterministic_vat_noise` fixture."""
    hidden = model.get_input_embeddings().weight.shape[1]
    noise = torch.randn((*batch["input_ids"].shape, hidden), generator=torch.Generator().manual_seed(1234))
    model.zero_grad()
    lds = vat_term(model, batch, noise, epsilon, xi, iterations)
    model.zero_grad()
    (_loss(model, batch) + weight * lds).backward()


# -- the registry's test table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A method's set-up in the tests: trainer flags, the reference step that must give the same gradients (on a model
    seeded as the trainer's), the training steps it needs to show its effect, and tiny-model config overrides."""

    flags: dict
    step: Callable
    steps: int = 1
    model: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.flags.get("adv_method") or next(
            name.removesuffix("_weight") for name in self.flags if name.endswith("_weight")
        )


# Every registered method needs at least one case (tests/test_gradients.py checks it); the first case of a method is
# the one the trainer, accumulation, DDP and compatibility tests run, so it draws no random numbers (FreeLB's random
# start differs between a run and its micro-batches run apart).
CASES: dict[str, Case] = {
    "fgm": Case(dict(adv_method="fgm", adv_epsilon=0.5), lambda m, b: fgm(m, b, 0.5)),
    "fgm-example": Case(
        dict(adv_method="fgm", adv_scope="example", adv_epsilon=0.5), lambda m, b: fgm_example(m, b, 0.5)
    ),
    "fgm-fraction": Case(
        dict(adv_method="fgm", adv_scope="example", adv_epsilon=0.5, adv_fraction=0.5),
        lambda m, b: fgm_example(m, b, 0.5, fraction=0.5),
    ),
    "fgm-fraction-token": Case(
        dict(adv_method="fgm", adv_epsilon=0.5, adv_fraction=0.5), lambda m, b: fgm_fraction(m, b, 0.5, 0.5)
    ),
    "fgsm": Case(dict(adv_method="fgsm", adv_epsilon=0.02), lambda m, b: fgm(m, b, 0.02, sign=True)),
    "fgsm-example": Case(
        dict(adv_method="fgsm", adv_scope="example", adv_epsilon=0.02),
        lambda m, b: fgm_example(m, b, 0.02, sign=True),
    ),
    "pgd": Case(
        dict(adv_method="pgd", adv_epsilon=0.5, adv_alpha=0.3, adv_steps=3), lambda m, b: pgd(m, b, 0.5, 0.3, 3)
    ),
    "pgd-1": Case(
        dict(adv_method="pgd", adv_epsilon=0.5, adv_alpha=0.3, adv_steps=1), lambda m, b: pgd(m, b, 0.5, 0.3, 1)
    ),
    "pgd-example": Case(
        dict(adv_method="pgd", adv_scope="example", adv_epsilon=0.5, adv_alpha=0.3, adv_steps=3),
        lambda m, b: pgd_example(m, b, 0.5, 0.3, 3),
    ),
    "awp": Case(dict(adv_method="awp", awp_lr=1.0, awp_eps=1e-2), lambda m, b: awp(m, b, 1.0, 1e-2)),
    "awp-discard": Case(
        dict(adv_method="awp", awp_lr=1.0, awp_eps=1e-2, awp_discard_clean_grad=True),
        lambda m, b: awp(m, b, 1.0, 1e-2, discard_clean_grad=True),
    ),
    "freelb-clean-bounded": Case(
        dict(adv_method="freelb", adv_steps=2, adv_alpha=0.5, adv_max_norm=0.3, freelb_clean_loss=True),
        lambda m, b: freelb(m, b, 0.5, 2, max_norm=0.3, clean_loss=True),
    ),
    "freelb": Case(
        dict(adv_method="freelb", adv_steps=3, adv_alpha=0.3, adv_init_mag=0.5),
        lambda m, b: freelb(m, b, 0.3, 3, init_mag=0.5),
    ),
    "carry": Case(dict(adv_method="carry", adv_epsilon=3.0), lambda m, b: carry(m, b, 3.0, steps=2), steps=2),
    "vat": Case(dict(vat_weight=0.7), lambda m, b: vat(m, b, 0.7)),
    "rdrop": Case(dict(rdrop_weight=0.5), lambda m, b: rdrop(m, b, 0.5), model=dict(hidden_dropout_prob=0.2)),
}


def first_case(method: str) -> Case:
    """The case the trainer, accumulation, DDP and compatibility tests run for `method`."""
    return next(case for case in CASES.values() if case.method == method)
