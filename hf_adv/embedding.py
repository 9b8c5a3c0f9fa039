"""Finding the input embedding of a model and watching what flows through it.

Every method in `hf_adv` works on the input word embedding: FGM, FGSM and PGD perturb the rows of its weight that
the batch looks up, VAT perturbs its output. `EmbeddingTap` is the one forward hook they share. During a
grad-enabled forward it records the looked-up indices and the output, so that a method can get the gradient of
the loss with respect to exactly the rows the batch touched, without materializing or copying the dense
vocab x hidden gradient of the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model under DDP, `torch.compile` and PEFT wrappers."""
    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    # PEFT: `get_base_model` returns the transformers model that holds the embeddings.
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def find_input_embedding(model: nn.Module, parameter_name: str | None = None) -> tuple[nn.Module, nn.Parameter]:
    """Find the input word-embedding module of `model` and its weight.

    Args:
        model (`nn.Module`):
            The model, possibly wrapped in DDP, `torch.compile` or PEFT.
        parameter_name (`str`, *optional*):
            Name of the embedding weight as in `model.named_parameters()` (for example
            `"bert.embeddings.word_embeddings.weight"`). By default the weight of `model.get_input_embeddings()`.

    Raises:
        `ValueError`: when the model has no input embeddings or no parameter of that name.
    """
    model = unwrap_model(model)
    if parameter_name is None:
        getter = getattr(model, "get_input_embeddings", None)
        module = None
        if getter is not None:
            try:
                module = getter()
            except NotImplementedError:
                module = None
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(
                f"{type(model).__name__} has no input embeddings: `model.get_input_embeddings()` returned "
                f"{type(module).__name__ if module is not None else None}. Adversarial training perturbs the input "
                "word embeddings; pass `adv_embedding_name` with the name of the embedding weight "
                "(one of the model's `named_parameters()`)."
            )
        return module, module.weight

    parameters = dict(model.named_parameters())
    if parameter_name not in parameters:
        candidates = [name for name, p in parameters.items() if p.dim() == 2 and "emb" in name.lower()]
        raise ValueError(
            f"adv_embedding_name={parameter_name!r} is not a parameter of {type(model).__name__}. "
            f"Embedding-like parameters of this model: {candidates or 'none'}."
        )
    module_name, _, attribute = parameter_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attribute != "weight" or parameters[parameter_name].dim() != 2:
        raise ValueError(
            f"adv_embedding_name={parameter_name!r} must name the 2-D `weight` of an embedding module "
            f"(vocab x hidden), got a {tuple(parameters[parameter_name].shape)} tensor named {attribute!r}."
        )
    return module, parameters[parameter_name]


class EmbeddingTap:
    """A forward hook on the input embedding that records lookups and can shift the output.

    While attached, every grad-enabled forward of the embedding appends its indices and its output to
    `self.indices` / `self.outputs`, and a tensor hook stores the output's gradient in `self.output_grads` when a
    backward reaches it. `self.delta`, when set, is added to the output (VAT perturbs the embedding output this way).

    Args:
        module (`nn.Module`): the embedding module, called with token indices.
        weight (`nn.Parameter`): its weight, vocab x hidden.
    """

    def __init__(self, module: nn.Module, weight: torch.Tensor):
        self.module = module
        self.weight = weight
        self.padding_idx = getattr(module, "padding_idx", None)
        self.scale_grad_by_freq = getattr(module, "scale_grad_by_freq", False)
        self.delta: torch.Tensor | None = None
        self._handle = None
        self._depth = 0
        self.reset()

    # -- attaching -------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.reset()

    @contextlib.contextmanager
    def attached(self) -> Iterator[EmbeddingTap]:
        """Attach for the duration of the block (re-entrant); the hook is removed on exit."""
        was_attached = self._handle is not None
        self.attach()
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()

    @contextlib.contextmanager
    def shifted(self, delta: torch.Tensor) -> Iterator[None]:
        """Add `delta` to the embedding output during the block."""
        previous, self.delta = self.delta, delta
        try:
            yield
        finally:
            self.delta = previous

    def reset(self) -> None:
        self.indices: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.output_grads: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            if self.delta is not None:
                return output + self.delta.to(output.dtype)
            return None
        if not output.requires_grad:
            # Frozen embeddings (PEFT, `requires_grad_(False)`): make the output a leaf that requires grad so the
            # attack still gets its gradient. The weight itself stays frozen.
            output = output.detach().requires_grad_(True)
        self.indices.append(args[0])
        self.outputs.append(output)
        output.register_hook(self.output_grads.append)
        if self.delta is not None:
            return output + self.delta.to(output.dtype)
        return output

    # -- gradients by touched row ----------------------------------------------------------------------------------
    def touched_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted unique rows looked up since the last reset, and for each lookup its position among them."""
        if not self.indices:
            raise RuntimeError(
                "The input embedding was not called in a grad-enabled forward since the last reset: "
                "run the model's forward on `input_ids` (not `inputs_embeds`) before attacking."
            )
        flat = torch.cat([i.reshape(-1) for i in self.indices])
        return torch.unique(flat, return_inverse=True)

    def rows_gradient(self, output_grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter gradients of the recorded outputs onto the touched rows.

        Returns `(rows, grad)` where `grad[i]` equals `weight.grad[rows[i]]` as `nn.Embedding`'s own backward would
        compute it for these lookups (padding row zeroed, `scale_grad_by_freq` honoured), and every other row's
        gradient is zero.
        """
        rows, inverse = self.touched_rows()
        hidden = self.weight.shape[-1]
        flat_grad = torch.cat([g.reshape(-1, hidden) for g in output_grads]).to(self.weight.dtype)
        grad = torch.zeros(rows.numel(), hidden, dtype=flat_grad.dtype, device=flat_grad.device)
        grad.index_add_(0, inverse, flat_grad)
        if self.scale_grad_by_freq:
            counts = torch.bincount(inverse, minlength=rows.numel()).clamp_min(1)
            grad = grad / counts.unsqueeze(1).to(grad.dtype)
        if self.padding_idx is not None:
            grad[rows == self.padding_idx] = 0
        return rows, grad

    def captured_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gradient of the backward passes that reached the outputs recorded since the last reset."""
        if len(self.output_grads) != len(self.outputs):
            raise RuntimeError(
                f"The embedding output was recorded {len(self.outputs)} times but received {len(self.output_grads)} "
                "gradients: call `backward()` on the loss before attacking."
            )
        return self.rows_gradient(self.output_grads)

    def gradient_of(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gradient of `loss` for the lookups recorded since the last reset, computing no parameter gradient."""
        output_grads = torch.autograd.grad(loss, self.outputs, allow_unused=True)
        output_grads = [torch.zeros_like(o) if g is None else g for o, g in zip(self.outputs, output_grads)]
        return self.rows_gradient(output_grads)
