"""Straightforward reference implementations, written from the published algorithms as the classic snippets do
(whole-matrix clones, `.grad` reads, gradient backups). The library's methods must give the same gradients."""

from __future__ import annotations

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
        return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(-1).mean()
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
