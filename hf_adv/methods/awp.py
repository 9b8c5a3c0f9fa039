"""AWP: adversarial weight perturbation (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization",
NeurIPS 2020), in the relative form used by competition solutions for transformers."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .base import AdversarialMethod, AttackResult, is_usable_norm, register_method


@register_method
class AWP(AdversarialMethod):
    """One relative step per weight tensor, w += lr * g / ||g|| * ||w||, clamped to w0 +- eps * |w0|.

    g is this micro-batch's gradient of each weight. The only memory kept is one copy of the weights perturbed
    (the classic class keeps two more for the bounds, which are recomputed here from that copy). Unlike the classic
    snippet the clean gradient is kept and the adversarial gradient adds to it; `discard_clean_grad=True`
    reproduces the snippet, which zeroes the gradients before the adversarial backward.

    Inside `capture()` the gradients accumulated by earlier micro-batches are set aside (a pointer swap, no copy)
    so that g is this micro-batch's alone, and put back before the adversarial backward, so that a distributed
    all-reduce in that backward sees the whole accumulated gradient.

    fp16: g / ||g|| is invariant to the GradScaler's loss scale; a tensor whose gradient norm is 0, NaN or Inf is
    left unperturbed, and the attack counts as skipped when every tensor was. Weights stored in a low-precision dtype
    move by what that dtype can represent; the reported norm is that of the change actually applied, and an `eps`
    below the dtype's resolution (bf16: 2**-7) is refused. Sparse gradients (`nn.Embedding(sparse=True)`) are used
    densely.

    Args:
        model (`nn.Module`): the model.
        lr (`float`, *optional*, defaults to `1.0`): `adv_lr` of the competition class, the step relative to ||w||.
        eps (`float`, *optional*, defaults to `1e-3`): relative bound, |w - w0| <= eps * |w0| element-wise.
            Competition solutions use 1e-3 or below; 1e-2 from the first step can destroy fine-tuning.
        param_pattern (`str`, *optional*): regular expression; only parameters whose name it matches
            (`re.search`) are perturbed. By default every weight matrix (2-D or more) that receives a gradient.
        discard_clean_grad (`bool`, *optional*, defaults to `False`): drop this micro-batch's clean gradient, as
            the classic snippet does.

    Raises:
        `ValueError`: for a non-positive `lr` or `eps`, a `param_pattern` that is invalid or matches no trainable
            weight matrix, or an `eps` below the resolution of a matched weight's dtype.
    """

    name = "awp"
    own_flags = ("awp_lr", "awp_eps", "awp_param_pattern", "awp_discard_clean_grad")
    uses_embedding = False
    moves_weights = True
    # AWP from the first step, on a fresh classifier head, can destroy fine-tuning: train clean for an epoch.
    default_start_epoch = 1.0

    @classmethod
    def args_kwargs(cls, args) -> dict:
        return {
            "lr": args.awp_lr,
            "eps": args.awp_eps,
            "param_pattern": args.awp_param_pattern,
            "discard_clean_grad": args.awp_discard_clean_grad,
        }

    @classmethod
    def describe(cls, args) -> str:
        return f"awp (lr {args.awp_lr}, eps {args.awp_eps})"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        eps: float = 1e-3,
        *,
        param_pattern: str | None = None,
        discard_clean_grad: bool = False,
        **kwargs,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        super().__init__(model, **kwargs)
        self.lr, self.eps, self.discard_clean_grad = lr, eps, discard_clean_grad
        try:
            pattern = re.compile(param_pattern) if param_pattern is not None else None
        except re.error as err:
            raise ValueError(f"param_pattern={param_pattern!r} is not a valid regular expression: {err}.") from None
        self.targets = [
            (name, p)
            for name, p in model.named_parameters()
            if p.requires_grad and p.dim() >= 2 and (pattern is None or pattern.search(name))
        ]
        if not self.targets:
            raise ValueError(
                f"param_pattern={param_pattern!r} matches no trainable weight matrix; some of the model's are "
                f"{[n for n, p in model.named_parameters() if p.dim() >= 2][:8]}."
            )
        resolution = {p.dtype: torch.finfo(p.dtype).eps for _, p in self.targets if p.is_floating_point()}
        too_coarse = {str(dtype).removeprefix("torch."): step for dtype, step in resolution.items() if eps < step}
        if too_coarse:
            step = max(too_coarse.values())
            raise ValueError(
                f"awp_eps={eps} is below the resolution of the {sorted(too_coarse)} weights AWP would perturb (one "
                f"step of the dtype is {step:g} of a weight's magnitude): every weight would round back to itself "
                "and AWP would do nothing. Keep the weights in float32 (load without `torch_dtype` and train with "
                f"--bf16 for bf16 compute), raise awp_eps to at least {step:g}, or restrict awp_param_pattern to "
                "float32 weights."
            )
        self._stash: dict[nn.Parameter, torch.Tensor] | None = None

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _restore_stash(self) -> None:
        if self._stash is None:
            return
        for p, earlier in self._stash.items():
            if p.grad is not None:
                earlier.add_(p.grad)
            p.grad = earlier
        self._stash = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self._stash = {}
        for p in self._trainable():
            if p.grad is not None:
                self._stash[p] = p.grad
                p.grad = None
        try:
            yield
        finally:
            self._restore_stash()

    @contextlib.contextmanager
    def perturbed(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs=None) -> Iterator[AttackResult]:
        backups: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            squared = None
            with torch.no_grad():
                for _, p in self.targets:
                    if p.grad is None:
                        continue
                    grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # nn.Embedding(sparse=True)
                    grad_norm = grad.norm()
                    if not is_usable_norm(grad_norm):
                        continue
                    original = p.detach().clone()
                    backups.append((p, original))
                    # clamp(w0 + step, w0 - b, w0 + b) == w0 + clamp(step, -b, b): clamping the step needs no bounds
                    # tensors kept alive, and its norm is the norm of the move. Two temporaries, updated in place.
                    step = grad * (self.lr * original.norm() / grad_norm)
                    bound = original.abs().mul_(self.eps)
                    torch.minimum(step, bound, out=step)
                    torch.maximum(step, bound.neg_(), out=step)
                    p.add_(step)
                    if p.dtype != torch.float32:
                        # The norm of the change actually applied, after rounding to the weight's dtype.
                        step = torch.sub(p, original, out=step)
                    moved = torch.linalg.vector_norm(step, dtype=torch.float32).square()
                    squared = moved if squared is None else squared + moved
            if self.discard_clean_grad:
                for p in self._trainable():
                    p.grad = None
            self._restore_stash()
            yield AttackResult(skipped=not backups, norm=None if squared is None else squared.sqrt())
        finally:
            with torch.no_grad():
                for p, original in backups:
                    p.copy_(original)
