"""Finding the input embedding of a model and watching what flows through it.

Every method in `hf_adv` works on the OUTPUT of the input word embedding, never on its weight: FGM, FGSM and PGD add
a perturbation shared by every occurrence of a vocabulary row (delta[b, t] = r[row(b, t)], the classic token-level
form), VAT adds one per position. `EmbeddingTap` is the one set of forward hooks they share, on every module that
looks up the embedding weight (an encoder-decoder's encoder and decoder `embed_tokens`, a siamese model's second
call). During a grad-enabled forward it records each lookup's indices and output, so that a method gets the
gradient of the loss with respect to exactly the rows the batch touched, as `nn.Embedding`'s own backward would
compute it, without materializing the dense vocab x hidden gradient; and it adds the perturbation to the outputs.
No weight is ever written: tied LM heads, shared encoder-decoder embeddings, low-precision, frozen and sharded
weights all see the weight as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .losses import lookup_masks


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model under DDP, `torch.compile` and PEFT wrappers."""
    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    # PEFT: `get_base_model` returns the transformers model that holds the embeddings.
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def find_input_embedding(
    model: nn.Module, parameter_name: str | None = None, *, argument: str = "embedding_name"
) -> tuple[nn.Module, nn.Parameter]:
    """Find the input word-embedding module of `model` and its weight.

    Args:
        model (`nn.Module`):
            The model, possibly wrapped in DDP, `torch.compile` or PEFT.
        parameter_name (`str`, *optional*):
            Name of the embedding weight as in `model.named_parameters(remove_duplicate=False)` (for example
            `"bert.embeddings.word_embeddings.weight"`, or `"transformer.encoder.embed_tokens.weight"` for a weight
            tied to another name). By default the weight of `model.get_input_embeddings()`.
        argument (`str`, *optional*): how the caller names `parameter_name` in error messages
            (`adv_embedding_name` in the trainer's arguments).

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
            if getter is None:
                found = "has no `get_input_embeddings()` method"
            elif module is None:
                found = "returned None from `get_input_embeddings()`"
            else:
                found = f"returned a {type(module).__name__} without a `weight` from `get_input_embeddings()`"
            raise ValueError(
                f"{type(model).__name__} has no input embeddings: it {found}. Adversarial training perturbs the "
                f"output of the input word embedding; pass `{argument}` with the name of the embedding weight (one "
                f"of the model's `named_parameters()`), or give the model a `get_input_embeddings()` method."
            )
        return module, module.weight

    # Tied weights appear under one name only in `named_parameters()`; accept every name they have.
    parameters = dict(model.named_parameters(remove_duplicate=False))
    if parameter_name not in parameters:
        candidates = [name for name, p in parameters.items() if p.dim() == 2 and "emb" in name.lower()]
        raise ValueError(
            f"{argument}={parameter_name!r} is not a parameter of {type(model).__name__}. "
            f"Embedding-like parameters of this model: {candidates or 'none'}."
        )
    module_name, _, attribute = parameter_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attribute != "weight" or parameters[parameter_name].dim() != 2:
        raise ValueError(
            f"{argument}={parameter_name!r} must name the 2-D `weight` of an embedding module "
            f"(vocab x hidden), got a {tuple(parameters[parameter_name].shape)} tensor named {attribute!r}."
        )
    return module, parameters[parameter_name]


def lookup_modules(model: nn.Module, module: nn.Module, weight: torch.Tensor) -> list[nn.Module]:
    """The modules whose forward looks up `weight`: `module` and every other `nn.Embedding` of `model` with that
    weight (a tied LM head is an `nn.Linear` and is not one of them), without a module that wraps another of them
    (PEFT's `ModulesToSaveWrapper` and LoRA embedding layers call the inner `nn.Embedding`: hooking both would add
    the perturbation twice)."""
    found = [module]
    for candidate in unwrap_model(model).modules():
        if candidate is not module and isinstance(candidate, nn.Embedding) and candidate.weight is weight:
            found.append(candidate)
    return [m for m in found if not any(other is not m and _contains(m, other) for other in found)]


def decoder_lookups(model: nn.Module, modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Those of `modules` that belong to a decoder (a module path with a `decoder` part, as T5, BART and every
    transformers encoder-decoder name it): their positions are the decoder's, masked by `decoder_attention_mask` or
    the labels, never by the encoder's `attention_mask`."""
    names = {id(m): name for name, m in unwrap_model(model).named_modules()}
    return [m for m in modules if "decoder" in names.get(id(m), "").split(".")]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(sub is inner for sub in outer.modules() if sub is not outer)


Delta = torch.Tensor | Sequence[torch.Tensor] | Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class EmbeddingTap:
    """Forward hooks on the input embedding lookups that record them and can shift their outputs.

    While active, every call of a lookup module appends its output's shape to `self.shapes`, and every grad-enabled
    call appends its indices, its module and its output to `self.indices` / `self.lookups` / `self.outputs`; a
    tensor hook stores the output's gradient at the same position of `self.output_grads` when a backward reaches it
    (so two lookups before one backward are never swapped). `self.delta`, when set, is added to the outputs: one
    tensor for every lookup, or a sequence with one tensor per lookup of a forward, in call order.

    The hooks can be installed once (`install()`) and stay inactive until `attached()` or `attach()`: a
    `torch.compile`d model must have them before its first compiled forward.

    Args:
        module (`nn.Module`): the embedding module, called with token indices.
        weight (`nn.Parameter`): its weight, vocab x hidden.
        modules (`list[nn.Module]`, *optional*): every module that looks up `weight` (see `lookup_modules`);
            by default `module` alone.
    """

    def __init__(self, module: nn.Module, weight: torch.Tensor, modules: Sequence[nn.Module] | None = None):
        self.module = module
        self.weight = weight
        self.modules = list(modules) if modules else [module]
        # Lookups whose positions are a decoder's (see `decoder_lookups`).
        self.decoder_modules: list[nn.Module] = []
        self.current_module: nn.Module | None = None
        self.delta: Delta | None = None
        self.active = False
        self._handles: list = []
        self._calls = 0
        self.reset()

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[-1]

    # -- attaching -------------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the hooks (inactive until `attached()`/`attach()`)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def attach(self) -> None:
        """Install the hooks and keep them active until `detach()`."""
        self.install()
        self.active = True

    def detach(self) -> None:
        self.active = False
        self.uninstall()
        self.reset()

    @contextlib.contextmanager
    def attached(self) -> Iterator[EmbeddingTap]:
        """Active for the duration of the block (re-entrant); on exit the recordings are dropped and hooks installed
        here are removed."""
        was_installed, was_active = bool(self._handles), self.active
        self.install()
        self.active = True
        try:
            yield self
        finally:
            self.active = was_active
            if not was_active:
                self.reset()  # no recorded tensor outlives the block
            if not was_installed:
                self.uninstall()

    @contextlib.contextmanager
    def shifted(self, delta: Delta) -> Iterator[None]:
        """Add `delta` to the lookup outputs during the block (see the class docstring for its forms)."""
        previous, self.delta = self.delta, delta
        self._calls = 0
        try:
            yield
        finally:
            self.delta = previous
            self._calls = 0

    def reset(self) -> None:
        self.indices: list[torch.Tensor] = []
        self.lookups: list[nn.Module] = []
        self.outputs: list[torch.Tensor] = []
        self.output_grads: list[torch.Tensor | None] = []
        self.shapes: list[torch.Size] = []  # of every lookup output, also in no-grad forwards
        self.shape_is_decoder: list[bool] = []  # for each of `shapes`, whether a decoder's lookup made it
        self._calls = 0

    @staticmethod
    def _store_grad(grads: list, position: int, grad: torch.Tensor) -> None:
        grads[position] = grad  # the list of the recording it belongs to, even after a reset

    def _delta_for(self, output: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        delta = self.delta
        if delta is None:
            return None
        if callable(delta) and not isinstance(delta, torch.Tensor):
            # Built for this call from its position, indices and output (FreeLB's start, carried row offsets).
            delta = delta(self._calls, ids, output)
        elif not isinstance(delta, torch.Tensor):
            delta = delta[self._calls % len(delta)]
        self._calls += 1
        if delta.shape != output.shape:
            raise RuntimeError(
                f"The embedding perturbation has shape {tuple(delta.shape)} but this lookup's output has shape "
                f"{tuple(output.shape)}: every pass of a step must run the model on the same batch, with the same "
                "embedding lookups in the same order."
            )
        return delta.to(output.dtype)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.active or not args or not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
            return None
        self.current_module = module  # for a delta function that needs to know the lookup (FreeLB's start)
        delta = self._delta_for(output, args[0])
        self.shapes.append(output.shape)
        self.shape_is_decoder.append(any(module is m for m in self.decoder_modules))
        if torch.is_grad_enabled():
            if not output.requires_grad:
                # Frozen embeddings (PEFT, `requires_grad_(False)`): make the output a leaf that requires grad so the
                # attack still gets its gradient. The weight itself stays frozen.
                output = output.detach().requires_grad_(True)
            self.indices.append(args[0])
            self.lookups.append(module)
            self.outputs.append(output)
            self.output_grads.append(None)
            output.register_hook(partial(self._store_grad, self.output_grads, len(self.outputs) - 1))
        if delta is not None:
            return output + delta
        return output if torch.is_grad_enabled() else None

    # -- gradients by touched row ----------------------------------------------------------------------------------
    def touched_rows(self, indices: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted unique rows looked up since the last reset (or in `indices`), and for each lookup position its
        row among them."""
        if indices is not None:
            return torch.unique(torch.cat([i.reshape(-1) for i in indices]), return_inverse=True)
        if not self.indices:
            raise RuntimeError(
                "No input-embedding lookup was recorded in a grad-enabled forward since the last reset: the model "
                "must look up `input_ids` in its input embedding (a batch of `inputs_embeds` cannot be attacked)."
            )
        flat = torch.cat([i.reshape(-1) for i in self.indices])
        return torch.unique(flat, return_inverse=True)

    def rows_gradient(
        self,
        output_grads: Sequence[torch.Tensor | None],
        touched: tuple[torch.Tensor, torch.Tensor] | None = None,
        indices: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter gradients of the recorded outputs onto the touched rows, in float32.

        Returns `(rows, grad)` where `grad[i]` equals `weight.grad[rows[i]]` as `nn.Embedding`'s own backward would
        compute it for these lookups (each lookup's padding positions skipped and its `scale_grad_by_freq` counts
        applied, per call as `nn.Embedding` does), and every other row's gradient is zero. For a module that scales
        its output (BART's scaled embedding) it is the gradient with respect to a shared offset of the output rows.
        `touched`: `touched_rows()` when already known for lookups of the same indices (PGD's inner steps).
        `indices`: the recorded lookups' indices restricted to some of their rows, with `output_grads` restricted
        alike (FGM on a fraction of the batch).
        """
        indices = self.indices if indices is None else indices
        rows, inverse = touched if touched is not None else self.touched_rows(indices)
        hidden = self.hidden_size
        parts = []
        for ids, module, output, grad in zip(indices, self.lookups, self.outputs, output_grads):
            shape = (*ids.shape, hidden)
            ids = ids.reshape(-1)
            grad = output.new_zeros(shape) if grad is None else grad
            grad = grad.reshape(-1, hidden).float()
            if getattr(module, "scale_grad_by_freq", False):
                _, position, counts = torch.unique(ids, return_inverse=True, return_counts=True)
                grad = grad / counts[position].unsqueeze(1).to(grad.dtype)
            padding_idx = getattr(module, "padding_idx", None)
            if padding_idx is not None:
                grad = grad.masked_fill((ids == padding_idx).unsqueeze(1), 0.0)
            parts.append(grad)
        flat_grad = torch.cat(parts)
        row_grad = torch.zeros(rows.numel(), hidden, dtype=flat_grad.dtype, device=flat_grad.device)
        row_grad.index_add_(0, inverse, flat_grad)
        return rows, row_grad

    def captured_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gradient of the backward passes that reached the outputs recorded since the last reset.

        Raises:
            `RuntimeError`: when no lookup was recorded, none received a gradient, or only some did (a grad-enabled
                forward ran without a backward, such as an accuracy check: its lookups would take the place of the
                clean pass's in the attack).
        """
        missing = sum(g is None for g in self.output_grads)
        if not self.outputs:
            raise RuntimeError(
                "No input-embedding lookup was recorded since the last reset: run the clean forward (on `input_ids`) "
                "and its backward before attacking."
            )
        if missing == len(self.outputs):
            raise RuntimeError(
                f"The embedding output was recorded {len(self.outputs)} times but received no gradient: call "
                "`backward()` on the loss before attacking."
            )
        if missing:
            raise RuntimeError(
                f"{missing} of the {len(self.outputs)} input-embedding lookups recorded since the last reset received "
                "no gradient: a forward with gradients enabled ran without a backward (an accuracy check, a probe), "
                "or part of the model's lookups do not reach the loss. Run such forwards under `torch.no_grad()`, "
                "and call the clean forward and backward inside `method.capture()`."
            )
        return self.rows_gradient(self.output_grads)

    def captured_output_gradients(self) -> list[torch.Tensor]:
        """The gradient at each recorded lookup output (float32), with the checks of `captured_gradient`."""
        self.captured_gradient_check()
        return [g.float() for g in self.output_grads]

    def captured_gradient_check(self) -> None:
        missing = sum(g is None for g in self.output_grads)
        if not self.outputs or missing:
            self.captured_gradient()  # raises the matching error

    def padding_masks(self, inputs=None) -> list[torch.Tensor | None]:
        """For each recorded lookup, its rows x sequence mask of real tokens: the batch's attention mask when
        `inputs` has one of the lookup's shape, else the positions that are not the module's `padding_idx`, else
        None (every position real)."""
        decoder = [any(module is m for m in self.decoder_modules) for module in self.lookups]
        if inputs is not None:
            found = lookup_masks(inputs, [o.shape for o in self.outputs], decoder)
        else:
            found = [None] * len(self.outputs)
        masks = []
        for mask, ids, module in zip(found, self.indices, self.lookups):
            padding_idx = getattr(module, "padding_idx", None)
            if mask is None and padding_idx is not None and ids.dim() == 2:
                mask = ids != padding_idx
            masks.append(mask)
        return masks

    def gradient_of(
        self, loss: torch.Tensor, touched: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gradient of `loss` for the lookups recorded since the last reset, computing no parameter gradient."""
        return self.rows_gradient(self.output_gradients(loss), touched)

    def output_gradients(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """Gradient of `loss` with respect to each recorded output (None where it does not depend on one)."""
        return list(torch.autograd.grad(loss, self.outputs, allow_unused=True))

    def row_deltas(
        self,
        r: torch.Tensor,
        touched: tuple[torch.Tensor, torch.Tensor] | None = None,
        indices: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """One output perturbation per recorded lookup (or per lookup of `indices`): delta[b, t] = r[row(b, t)] for
        the touched-row offsets `r`."""
        indices = self.indices if indices is None else indices
        _, inverse = touched if touched is not None else self.touched_rows(indices)
        deltas, start = [], 0
        for ids in indices:
            n = ids.numel()
            deltas.append(r[inverse[start : start + n]].reshape(*ids.shape, r.shape[-1]))
            start += n
        return deltas

    def output_shapes(self) -> list[torch.Size]:
        """Shapes of the lookup outputs since the last reset, in call order."""
        return list(self.shapes)

    def is_decoder(self, module: nn.Module | None) -> bool:
        """Whether `module` is one of the decoder's lookups."""
        return any(module is m for m in self.decoder_modules)

    def output_is_decoder(self) -> list[bool]:
        """For each of `output_shapes()`, whether a decoder's lookup made it."""
        return list(self.shape_is_decoder)


# -- per-example geometry of embedding outputs (example scope, VAT, FreeLB, the robustness attacks) ------------------
def normalize_per_example(d: torch.Tensor) -> torch.Tensor:
    """Scale each example (first dimension) of `d` to unit L2 norm over all its other dimensions (0 stays 0)."""
    return normalize_lookups([d])[0]


def example_norms(ds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each lookup's output perturbation (rows x ...), the L2 norm of each row's example: taken over all the
    lookups of a forward together when they have the same number of rows (a siamese model's two texts, an
    encoder-decoder's two sides), else over each lookup alone."""
    if len(ds) == 1 or len({d.shape[0] for d in ds}) != 1:
        return [d.flatten(1).norm(dim=1) for d in ds]
    joint = torch.stack([d.flatten(1).norm(dim=1) for d in ds]).norm(dim=0)
    return [joint] * len(ds)


def _per_row(scale: torch.Tensor | float, d: torch.Tensor) -> torch.Tensor | float:
    """`scale` (a float, or one value per example) shaped to multiply the rows of `d`."""
    return scale.view(-1, *([1] * (d.dim() - 1))) if isinstance(scale, torch.Tensor) else scale


def normalize_lookups(ds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scale each example to unit L2 norm (over its lookups together, see `example_norms`); a zero example stays
    zero."""
    return [d / _per_row(n.clamp_min(1e-12), d) for d, n in zip(ds, example_norms(ds))]


def project_lookups(ds: Sequence[torch.Tensor], epsilon: float | torch.Tensor) -> list[torch.Tensor]:
    """Project each example onto the L2 ball of radius `epsilon` (a float, or one radius per example) over its
    lookups together."""
    return [d * _per_row((epsilon / n.clamp_min(1e-12)).clamp(max=1.0), d) for d, n in zip(ds, example_norms(ds))]


def ascent_step(
    deltas: Sequence[torch.Tensor] | None,
    directions: Sequence[torch.Tensor],
    alpha: float | torch.Tensor,
    epsilon: float | torch.Tensor,
) -> list[torch.Tensor]:
    """One PGD step in example scope (Madry et al., ICLR 2018): `deltas + alpha * directions`, projected onto the L2
    ball of radius `epsilon` per example (`alpha` and `epsilon`: floats, or one value per example). `directions` are
    the normalized gradients (`normalize_lookups`); `deltas=None` starts from zero. The step of example-scope PGD
    training and of the robustness evaluation's PGD."""
    steps = [_per_row(alpha, g) * g for g in directions]
    moved = steps if deltas is None else [d + s for d, s in zip(deltas, steps)]
    return project_lookups(moved, epsilon)


def mask_lookups(ds: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Zero each lookup's padding positions (`masks`: rows x sequence, 1 for a real token, or None)."""
    return [d if m is None else d * m.unsqueeze(-1).to(d.dtype) for d, m in zip(ds, masks)]
