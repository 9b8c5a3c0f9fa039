"""`AdversarialTrainer`: `transformers.Trainer` with a perturbation (FGM, FGSM, PGD, AWP, FreeLB, carried FGM) and
regularizers (VAT, R-Drop) in every training step.

Data flow: `AdversarialTrainingArguments` (flat `adv_*`, `awp_*`, `vat_*`, `freelb_*`, `rdrop_*` fields) ->
`AdversarialMixin.__init__` builds the perturbation named by `adv_method` and every regularizer whose weight is > 0
from the registry (`hf_adv.methods`), sharing one set of embedding hooks installed inactive before any
`torch.compile` -> `training_step` runs, for each micro-batch, with a `hf_adv.step.TrainingStep`:

1. the clean pass: the user's `compute_loss` (or `compute_loss_func`, label smoothing, the model's own loss), held
   to be back-propagated with the next term, or at once when the perturbation needs its gradient;
2. the perturbation's passes (`AdversarialMethod.train_step`), whose gradients add to the clean one;
3. each regularizer's term (`Regularizer.term`), whose gradient adds too;
4. the losses, logged with the training loss.

Every pass gets its own shallow copy of the batch, so a `compute_loss` that pops `labels` changes nothing for the
next pass. Every backward but the step's last runs under `accelerator.no_sync`, and the last one triggers the DDP
all-reduce, so gradients are reduced once per optimizer step whatever the number of passes.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import defaultdict
from collections.abc import Mapping

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from packaging import version
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.utils import logging

from .arguments import AdversarialTrainingArguments
from .distillation import Distillation
from .embedding import EmbeddingTap, decoder_lookups, find_input_embedding, lookup_modules, unwrap_model
from .losses import unlabelled_rows
from .methods import AdversarialMethod, Regularizer
from .robustness import adversarial_accuracy
from .semi_supervised import LABEL_KEYS, UnlabeledMixCollator, UnlabeledMixDataset
from .step import TrainingStep, select_rows

logger = logging.get_logger(__name__)


# `gradient_checkpointing_enable()` without kwargs: reentrant checkpointing before transformers 5, not since.
_TRANSFORMERS_VERSION = version.parse(transformers.__version__).release
_REENTRANT_BY_DEFAULT = _TRANSFORMERS_VERSION < (5,)
# Under gradient accumulation transformers 4.46 and 4.47 back-propagate each micro-batch's mean loss undivided (the
# micro-batches' gradients are summed); from 4.48 the parent divides by the number of micro-batches.
_PARENT_SUMS_MICRO_BATCHES = _TRANSFORMERS_VERSION < (4, 48)


def _saved_weights_context(adversary, regularizers) -> contextlib.AbstractContextManager:
    """A perturbation that moves the weights in place (AWP) beside a regularizer that back-propagates through the
    clean pass's graph after it (R-Drop): that graph saved the weights before they moved, so autograd would refuse the
    backward ("modified by an inplace operation"). Under `allow_mutation_on_saved_tensors` a saved tensor is cloned
    when it is written, so the clean graph keeps the weights it was computed with (AWP restores them bit for bit
    anyway); it costs a copy of the moved weights that the clean graph saved, and nothing otherwise."""
    if adversary is not None and adversary.moves_weights and any(r.needs_clean_graph for r in regularizers):
        return torch.autograd.graph.allow_mutation_on_saved_tensors()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _sync_in_backward(model: DistributedDataParallel, loss: torch.Tensor):
    """Make the backward of `loss` all-reduce the gradients although its forward ran under `no_sync`.

    `Accelerator.trigger_sync_in_backward` calls `reducer.prepare_for_backward([])`. With `find_unused_parameters=True`
    (the Trainer's default for a transformers model) DDP searches the graph of the tensors it is given for the
    parameters that will receive a gradient; given none, it takes every parameter for unused, marks them all ready at
    the first gradient hook, and the backward fails with "Expected to mark a variable ready only once". Given the loss,
    it searches the graph this backward runs.
    """
    old = (model.require_backward_grad_sync, model.require_forward_param_sync)
    model.require_backward_grad_sync = model.require_forward_param_sync = True
    model.reducer.prepare_for_backward([loss])
    try:
        yield
    finally:
        model.require_backward_grad_sync, model.require_forward_param_sync = old


class _OutputCapture:
    """A forward hook on the model, installed once (before any `torch.compile`), that keeps the outputs of its last
    call while active: VAT's clean predictions, however the user's `compute_loss` calls the model."""

    def __init__(self, model: nn.Module):
        self.active = False
        self.outputs = None
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.active:
            self.outputs = output

    @contextlib.contextmanager
    def capturing(self):
        previous = self.active
        self.active, self.outputs = True, None
        try:
            yield self
        finally:
            self.active = previous

    def remove(self) -> None:
        self._handle.remove()


def _loss_uses_num_items(model: nn.Module) -> bool:
    """Whether the model's own loss divides by `num_items_in_batch`: its forward calls `self.loss_function`, and
    that is one of transformers' token-level losses (causal LM, masked LM, token classification), which normalise
    by the number of label tokens of the whole accumulated batch."""
    model = unwrap_model(model)
    try:
        from transformers.loss import loss_utils

        names = ("ForCausalLMLoss", "ForMaskedLMLoss", "ForTokenClassification")  # ForMaskedLMLoss: from 4.47
        token_level = tuple(getattr(loss_utils, name) for name in names if hasattr(loss_utils, name))
        calls_loss_function = "self.loss_function(" in inspect.getsource(type(model).forward)
        return calls_loss_function and getattr(model, "loss_function", None) in token_level
    except (ImportError, OSError, TypeError, AttributeError, KeyError, ValueError):
        return False


def _uses_reentrant_checkpointing(args, model: nn.Module) -> bool:
    """Whether gradient checkpointing will run reentrant (`torch.autograd.grad` then fails on checkpointed layers)."""
    enabled = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    if enabled:
        kwargs = (
            getattr(args, "activation_checkpointing_kwargs", None)
            or getattr(args, "gradient_checkpointing_kwargs", None)
        ) or {}
        return bool(kwargs.get("use_reentrant", _REENTRANT_BY_DEFAULT))
    for module in unwrap_model(model).modules():  # enabled by the user on the model itself
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def _allow_retained_compiled_graphs() -> None:
    """A regularizer that differentiates through the clean pass (R-Drop) after a perturbation has back-propagated it
    needs its graph kept (`retain_graph=True`), which `torch.compile`'s backward refuses when it donates buffers."""
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # pragma: no cover - torch without functorch
        return
    if getattr(functorch_config, "donated_buffer", False):
        functorch_config.donated_buffer = False
        logger.info("torch.compile backward no longer donates buffers (the clean graph is kept for a regularizer).")


def _guard_compiled_code_on_hooks() -> None:
    """Make `torch.compile` check module hooks before reusing compiled code.

    By default dynamo does not guard on nn.Module hooks: code compiled for a model without our hooks (an earlier
    fold, a plain run in the same process) would be reused for this one and its embedding never hooked. The first
    time, code compiled so far is dropped (`torch._dynamo.reset()`: it was compiled without those guards).
    """
    try:
        import torch._dynamo
    except ImportError:  # pragma: no cover - torch without dynamo
        return
    if getattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False):
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()
        logger.info("torch.compile now checks module hooks before reusing compiled code (for the embedding hooks).")


# Config fields whose value > 0 makes a model skip parameters in some forward passes: dropped layers (LayerDrop,
# wav2vec2's `layerdrop`, M2M100's `encoder_layerdrop`), and mixture-of-experts routing (an expert that no token
# of the batch is routed to gets no gradient).
_UNUSED_PARAMETER_FIELDS = ("layerdrop", "num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
_UNUSED_PARAMETER_ERROR = "Expected to have finished reduction in the prior iteration"


def _may_leave_parameters_unused(model: nn.Module) -> bool:
    """Whether a transformers model may run a forward that leaves trainable parameters without a gradient, by its
    config: dropped layers or mixture-of-experts. Our methods themselves give every parameter its gradient (the DDP
    tests train each with `find_unused_parameters=False`)."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return True
    for key, value in config.to_dict().items():
        if any(name in key for name in _UNUSED_PARAMETER_FIELDS) and isinstance(value, (int, float)) and value > 0:
            return True
    return False


class _UnlabeledEpoch(TrainerCallback):
    """Tells the training dataset which epoch begins, before the Trainer makes the epoch's iterator (and its
    DataLoader workers), so the unlabelled rows it draws are the epoch's. Accelerate's own epoch count cannot be
    used: it reaches the dataset only when the sampler has no `set_epoch` (not under DDP), and restarts at 0 in the
    loader that skips a resumed epoch's first batches. After a resume mid-epoch, the epoch is the checkpoint's
    (`state.epoch`, e.g. 1.5 -> 1), as is the rest of its data order. `dataset` is the one of the latest training
    DataLoader (`get_train_dataloader` sets it)."""

    def __init__(self):
        self.dataset: UnlabeledMixDataset | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.dataset is not None:
            self.dataset.begin_epoch(int(state.epoch or 0))


class AdversarialMixin:
    """The adversarial training step, for any `transformers.Trainer` subclass: put it first among the bases,
    `class MyTrainer(AdversarialMixin, SFTTrainer)`, and pass `args` of a class that has the
    `AdversarialTrainingArguments` fields (that class itself, or one composed with another config:
    `@dataclass class Config(AdversarialTrainingArguments, SFTConfig): pass`). `AdversarialTrainer` is this mixin on
    `Trainer`.

    Takes the same arguments as the trainer it extends, including `compute_loss_func`, and honours a subclass's
    `compute_loss` and `label_smoothing_factor`. With `adv_method="none"` and `vat_weight=0` the training step is the
    parent's, untouched.

    A batch row whose labels are all -100 is unlabelled: it gets no supervised pass (clean or adversarial), only the
    VAT term (semi-supervised VAT). `unlabeled_dataset=` (examples with the model inputs of `train_dataset`; any
    label is ignored) mixes `args.unlabeled_ratio` unlabelled rows per labelled row into every training batch
    (`hf_adv.semi_supervised`) in the training DataLoader only (`train_dataset` stays the labelled rows); epochs and
    `max_steps` still count labelled rows, and the logs add the rows seen, `labeled_rows` and `unlabeled_rows`
    (totals over processes since the last log).

    Logged with the training loss, to every `report_to` integration: `clean_loss`, `adv_loss`, `vat_loss` (means
    over the micro-batches since the last log), `adv_perturbation_norm`, and `adv_skipped` / `vat_skipped` (attacks
    skipped because the gradient norm was 0, NaN or Inf). The reported `loss` stays the clean loss, comparable with
    a plain `Trainer` run (with distillation, `teacher_model=` or `distill_teacher`, every pass's loss is the
    distillation loss: see `hf_adv.distillation`).

    Raises:
        `TypeError`: when `args` is not an `AdversarialTrainingArguments`.
        `ValueError`: at construction, for a set-up the methods cannot train correctly: DeepSpeed or FSDP,
            `torch.nn.DataParallel`, LOMO optimizers, reentrant gradient checkpointing with PGD (K > 1) or VAT, AWP
            on weights too coarse for `awp_eps`, a model without an input embedding.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: AdversarialTrainingArguments | None = None,
        *a,
        teacher_model: nn.Module | None = None,
        unlabeled_dataset=None,
        **kw,
    ):
        if args is None:
            args = AdversarialTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, AdversarialTrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs `args` of type AdversarialTrainingArguments, got {type(args).__name__}; "
                "build it with the same fields plus adv_method=... (to keep another config class's fields, compose "
                f"them: `@dataclass class Config(AdversarialTrainingArguments, {type(args).__name__}): pass`), or use "
                "the parent trainer for plain training."
            )
        if unlabeled_dataset is None and args.unlabeled_ratio != 1.0:
            raise ValueError(
                f"unlabeled_ratio={args.unlabeled_ratio} is read only with unlabelled data, and there is none: pass "
                "unlabeled_dataset=... (semi-supervised VAT), or leave unlabeled_ratio at its default."
            )
        if unlabeled_dataset is not None:
            args.check_unlabeled_data()
        super().__init__(model, args, *a, **kw)
        self.unlabeled_dataset = unlabeled_dataset
        if unlabeled_dataset is not None:
            self._mixed_training_set(self.train_dataset)  # what the training DataLoader could not mix, refused now
            self._unlabeled_epoch = _UnlabeledEpoch()
            self.add_callback(self._unlabeled_epoch)
        # Models whose forward takes **kwargs are given `num_items_in_batch` and trusted to divide by it, which
        # sequence-classification heads do not do: gradient accumulation would then sum instead of average. Only
        # models whose own loss does divide by it (language models, token classification) keep it.
        self.model_accepts_loss_kwargs = bool(self.model_accepts_loss_kwargs) and _loss_uses_num_items(self.model)
        if not hasattr(self, "current_gradient_accumulation_steps"):
            # Set for each accumulation window by `train()` from transformers 4.57 (fewer for an epoch's last, short
            # window); before 4.57 the parent divides by `gradient_accumulation_steps` throughout.
            self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps
        self._check_supported()
        self.adversary: AdversarialMethod | None = None
        self.regularizers: list[Regularizer] = []
        self.tap: EmbeddingTap | None = None
        # Defensive distillation (`distill_teacher`, or a `teacher_model` module): every pass's loss becomes it.
        self.distillation = Distillation.from_args(self.model, args, teacher_model)
        self._outputs: _OutputCapture | None = None
        self._methods_model: nn.Module | None = None
        self._build_methods(self.model)
        self._adv_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = self.args.resolved_start_epoch
        if self.args.adversarial and self.args.max_steps <= 0 and start >= self.args.num_train_epochs:
            logger.warning(
                f"adv_start_epoch={start} is not before num_train_epochs={self.args.num_train_epochs}: the "
                f"{self.args.describe_methods()} will never run. Lower adv_start_epoch or train longer."
            )

    # -- set-up ------------------------------------------------------------------------------------------------------
    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        """The parent's, and under DDP `find_unused_parameters=False` when the user left `ddp_find_unused_parameters`
        unset and the model is a transformers model whose config shows no dropped layers and no experts.

        The parent's default for a transformers model is True: DDP then searches every backward's graph for
        parameters without a gradient and, finding none, warns on every rank. A user's value always wins, and so
        does the parent's False (gradient checkpointing). Should the model leave a parameter without gradient after
        all, `train()` says which flag to set."""
        wrapped = super()._wrap_model(model, training, dataloader)
        handler = getattr(getattr(self, "accelerator", None), "ddp_handler", None)
        if (
            training
            and handler is not None
            and self.args.ddp_find_unused_parameters is None
            and getattr(handler, "find_unused_parameters", False)
            and isinstance(unwrap_model(model), PreTrainedModel)
            and not _may_leave_parameters_unused(model)
        ):
            handler.find_unused_parameters = False
            self._chose_find_unused_false = True
            logger.info(
                "DDP: find_unused_parameters=False (ddp_find_unused_parameters unset, and the model uses every "
                "parameter in each forward); set ddp_find_unused_parameters=True for a model that does not."
            )
        return wrapped

    def train(self, *args, **kwargs):
        """The parent's; with `unlabeled_dataset`, the returned metrics add `train_labeled_rows` and
        `train_unlabeled_rows`, the rows this call trained on, summed over processes (every process must call it, as
        for any training)."""
        self._rows_seen = torch.zeros(2, dtype=torch.float64)
        try:
            output = super().train(*args, **kwargs)
        except RuntimeError as error:
            if getattr(self, "_chose_find_unused_false", False) and _UNUSED_PARAMETER_ERROR in str(error):
                raise RuntimeError(
                    "This model left parameters without a gradient under DDP, and hf_adv had set "
                    "find_unused_parameters=False because ddp_find_unused_parameters was unset: set "
                    "ddp_find_unused_parameters=True (--ddp_find_unused_parameters true)."
                ) from error
            raise
        if self.unlabeled_dataset is not None:
            seen = self._rows_seen.to(self.args.device)
            if self.accelerator.num_processes > 1:
                seen = self.accelerator.reduce(seen, reduction="sum")
            output.metrics["train_labeled_rows"] = int(seen[0])
            output.metrics["train_unlabeled_rows"] = int(seen[1])
        return output

    def _check_supported(self) -> None:
        args = self.args
        if args.distill_teacher and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            engine = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
            raise ValueError(
                f"distill_teacher={args.distill_teacher!r}: the teacher is not sharded with {engine}, and "
                "distillation is not supported with it. Use DDP (`accelerate launch --multi_gpu`) or one device."
            )
        if args.distill_train_temperature != 1.0 and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            engine = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
            raise ValueError(
                f"distill_train_temperature={args.distill_train_temperature:g} is not supported with {engine}. Use "
                "DDP (`accelerate launch --multi_gpu`) or one device."
            )
        if not args.adversarial:
            return
        described = args.describe_methods()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            engine = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
            raise ValueError(
                f"{described} runs several backward passes per micro-batch (and AWP moves weights in place), which "
                f"is not supported with {engine}'s sharded parameters and gradients. Use DDP (`accelerate launch "
                "--multi_gpu`) or adv_method='none' with vat_weight=0."
            )
        if "lomo" in str(args.optim).lower():
            raise ValueError(
                f"optim={args.optim!r} updates the weights inside backward(); adversarial methods run several "
                "backward passes per step, which would apply several updates. Choose another optimizer."
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"adv_method={args.adv_method!r} does not support torch.nn.DataParallel (n_gpu={args.n_gpu}); launch "
                "one process per GPU with `accelerate launch` or `torchrun` instead."
            )
        needs_input_grad = [
            described
            for cls, described in args.configured_methods()
            if getattr(cls, "needs_input_gradient", lambda a: False)(args)
        ]
        if needs_input_grad and _uses_reentrant_checkpointing(args, self.model):
            raise ValueError(
                f"{' and '.join(needs_input_grad)} computes input gradients with torch.autograd.grad, which reentrant "
                'gradient checkpointing does not allow. Pass gradient_checkpointing_kwargs={"use_reentrant": False} '
                "(non-reentrant checkpointing saves the same memory), or turn gradient checkpointing off."
            )

    def _build_methods(self, model: nn.Module) -> None:
        """The configured perturbation (`adv_method`) and regularizers (each registered regularizer whose weight
        flag is > 0), sharing one set of embedding hooks, installed inactive."""
        args = self.args
        for old in (self.tap, self._outputs):
            if old is not None:
                old.uninstall() if isinstance(old, EmbeddingTap) else old.remove()
        self.adversary, self.regularizers, self.tap, self._outputs = None, [], None, None
        classes = [cls for cls, _ in args.configured_methods()]
        if any(cls.uses_embedding for cls in classes):
            module, weight = find_input_embedding(model, args.adv_embedding_name, argument="adv_embedding_name")
            self.tap = EmbeddingTap(module, weight, lookup_modules(model, module, weight))
            self.tap.decoder_modules = decoder_lookups(model, self.tap.modules)
        common = {"tap": self.tap, "attach": False, "embedding_argument": "adv_embedding_name"}
        for cls in classes:
            method = cls.from_args(model, args, **common)
            if cls.kind == "perturbation":
                self.adversary = method
            else:
                self.regularizers.append(method)
        if (
            self.regularizers
            or (self.adversary is not None and not self.adversary.trains_clean_pass)
            or self.distillation is not None
        ):
            self._outputs = _OutputCapture(extract_model_from_parallel(model, keep_fp32_wrapper=True))
        if any(r.needs_clean_graph for r in self.regularizers) and self.adversary is not None:
            _allow_retained_compiled_graphs()
        if self.tap is not None:
            # Installed now, inactive until the training step: a compiled model must have its hooks before its first
            # compiled forward (hooks added later are not seen by the compiled graph).
            self.tap.install()
            _guard_compiled_code_on_hooks()
        self._methods_model = unwrap_model(model)
        self._metric_names = ["clean_loss"]
        self._summed_metrics: set[str] = set()
        if getattr(self, "unlabeled_dataset", None) is not None:
            self._metric_names += ["labeled_rows", "unlabeled_rows"]
            self._summed_metrics.update(("labeled_rows", "unlabeled_rows"))
        for method in [self.adversary, *self.regularizers]:
            if method is not None:
                self._metric_names += [m for m in method.metrics if m not in self._metric_names]
                self._summed_metrics.update(method.summed_metrics)

    def _check_unlabeled(self, train, unlabeled_dataset) -> None:
        """Refuse, with the fix, what semi-supervised training cannot mix: see `_mixed_training_set`."""
        args = self.args
        if train is None or isinstance(train, torch.utils.data.IterableDataset) or not hasattr(train, "__len__"):
            raise ValueError(
                "unlabeled_dataset needs a train_dataset with a length (a datasets.Dataset or a map-style torch "
                f"Dataset), got {type(train).__name__}: each labelled row brings its share of unlabelled rows."
            )
        if isinstance(train, UnlabeledMixDataset):
            raise ValueError("train_dataset is already mixed with unlabelled rows: pass the labelled dataset itself.")
        kind = type(unlabeled_dataset)
        if kind.__module__.startswith("pandas"):
            raise ValueError(
                f"unlabeled_dataset is a pandas {kind.__name__}: make it a dataset of tokenized examples, e.g. "
                "datasets.Dataset.from_pandas(frame).map(tokenize, batched=True)."
            )
        if isinstance(unlabeled_dataset, Mapping):  # a DatasetDict, a dict of columns, a tokenizer's BatchEncoding
            raise ValueError(
                f"unlabeled_dataset is a {kind.__name__} (its keys: {list(unlabeled_dataset)[:5]}), not a dataset of "
                "examples: pass dataset['train'] of a DatasetDict, or datasets.Dataset.from_dict(dict(columns)) for "
                "columns (a tokenizer's output among them)."
            )
        if isinstance(unlabeled_dataset, torch.utils.data.IterableDataset) or not hasattr(
            unlabeled_dataset, "__len__"
        ):
            raise ValueError(
                f"unlabeled_dataset must be a datasets.Dataset or a map-style dataset with a length, got "
                f"{kind.__name__}."
            )
        UnlabeledMixDataset(train, unlabeled_dataset, args.unlabeled_ratio)  # its own checks: ratio, empty datasets
        if len(unlabeled_dataset) and len(train):
            example, labelled = unlabeled_dataset[0], train[0]
            if not isinstance(example, Mapping):
                raise ValueError(
                    f"unlabeled_dataset's examples must be dicts of model inputs, as train_dataset's are; its first "
                    f"is a {type(example).__name__}. Tokenize the texts first (dataset.map(tokenize, batched=True))."
                )
            if isinstance(labelled, Mapping) and not any(k in labelled for k in LABEL_KEYS):
                names = getattr(self, "label_names", None)
                raise ValueError(
                    f"train_dataset's examples have no label column among {list(LABEL_KEYS)} (their keys: "
                    f"{sorted(labelled)}; label_names={names}): semi-supervised training marks an unlabelled row by "
                    "-100 in that one column. Rename the label column to 'labels'."
                )
            missing = [k for k in self._model_input_keys(labelled) if k not in example]
            if missing:
                raise ValueError(
                    f"unlabeled_dataset has no {missing} (its columns: {sorted(example)}), which train_dataset's "
                    "examples give the model: tokenize it the same way (dataset.map(tokenize, batched=True)), or "
                    "add the columns."
                )
            if math.floor(len(train) * args.unlabeled_ratio) == 0:
                raise ValueError(
                    f"unlabeled_ratio={args.unlabeled_ratio:g} with {len(train)} labelled rows draws no unlabelled "
                    f"row in an epoch: use at least {1 / len(train):.3g}."
                )
        if getattr(args, "group_by_length", False):  # removed in transformers 5.x
            raise ValueError(
                "group_by_length=True sorts the training rows by length, which the batches mixed with unlabelled "
                "rows cannot follow: set group_by_length=False with unlabeled_dataset."
            )

    def _model_input_keys(self, example) -> list[str]:
        """The keys of a labelled example that reach the collator and the model, labels aside: those the model's
        forward takes when `remove_unused_columns` (the parent drops the others), else all."""
        if not isinstance(example, Mapping):
            return []
        keys = [k for k in example if k not in LABEL_KEYS]
        if self.args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            keys = [k for k in keys if k in self._signature_columns]
        return keys

    @property
    def unlabeled_mix(self) -> UnlabeledMixDataset | None:
        """The `UnlabeledMixDataset` of the latest training DataLoader (`unlabelled_indices(i, epoch)` says which
        unlabelled rows labelled row `i` brings); None without unlabelled data or before `train()`."""
        epoch = getattr(self, "_unlabeled_epoch", None)
        return epoch.dataset if epoch is not None else None

    def get_train_dataloader(self, *args, **kwargs):
        """The parent's; with `unlabeled_dataset`, over an `UnlabeledMixDataset` of the current `train_dataset` (see
        `hf_adv.semi_supervised`): each labelled row brings its share of unlabelled rows, labelled -100 by an
        `UnlabeledMixCollator` around the collator. `train_dataset` and `data_collator` stay the user's, so
        `evaluate(trainer.train_dataset)` scores the labelled rows alone."""
        if self.unlabeled_dataset is None:
            return super().get_train_dataloader(*args, **kwargs)
        labelled, collator = self.train_dataset, self.data_collator
        mixed = self._mixed_training_set(labelled)
        self._unlabeled_epoch.dataset = mixed
        self.train_dataset = mixed
        self.data_collator = UnlabeledMixCollator(
            collator, self._get_collator_with_removed_columns(collator, description="training")
        )
        try:
            return super().get_train_dataloader(*args, **kwargs)
        finally:
            self.train_dataset, self.data_collator = labelled, collator

    def _mixed_training_set(self, train) -> UnlabeledMixDataset:
        """`train` with `unlabeled_ratio` unlabelled rows per labelled row (`hf_adv.semi_supervised`), the columns
        the model does not take removed from both as the parent removes them."""
        args, unlabeled_dataset = self.args, self.unlabeled_dataset
        self._check_unlabeled(train, unlabeled_dataset)
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency of the recipes, not of the trainer
            datasets = None
        if datasets is not None and args.remove_unused_columns:
            # The columns the model does not take (texts, ids) go, as the parent does for its own datasets.
            if isinstance(train, datasets.Dataset):
                train = self._remove_unused_columns(train, description="training")
            if isinstance(unlabeled_dataset, datasets.Dataset):
                unlabeled_dataset = self._remove_unused_columns(unlabeled_dataset, description="training")
        return UnlabeledMixDataset(
            train,
            unlabeled_dataset,
            args.unlabeled_ratio,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )

    @property
    def vat(self):
        """The VAT regularizer, when `vat_weight > 0`."""
        return next((r for r in self.regularizers if r.name == "vat"), None)

    def _attack_active(self) -> bool:
        epoch = self.state.epoch or 0.0
        return self.state.global_step >= self.args.adv_start_step and epoch >= self.args.resolved_start_epoch

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The parent's rule: a loss normalised by `num_items_in_batch` (by the model or `compute_loss_func`) is
        already scaled for gradient accumulation; a per-micro-batch mean is divided by the number of micro-batches."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        # Before 4.49 `num_items_in_batch` is None unless the model takes loss kwargs (which we turn off): a
        # `compute_loss_func` then gets None and returns a per-micro-batch mean.
        return num_items_in_batch is not None and bool(
            self.model_accepts_loss_kwargs or getattr(self, "compute_loss_func", None) is not None
        )

    # -- the training step -------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None, *args, **kwargs) -> torch.Tensor:
        attacking = self.args.adversarial and self._attack_active()
        if self.unlabeled_dataset is not None:
            self._count_rows(inputs)
        # The parent's step, unless rows without labels (all -100) need leaving out: a method is configured (VAT
        # learns from them once it starts) and the batch has some; a multi-label BCE would train towards -100.
        plain = not attacking and self.distillation is None
        if plain and self.unlabeled_dataset is None and self.args.adversarial:
            plain = unlabelled_rows(self._batch_labels(inputs)) is None
        if plain and self.unlabeled_dataset is None:
            if _PARENT_SUMS_MICRO_BATCHES and self.args.gradient_accumulation_steps > 1:
                return self._clean_training_step(model, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        if unwrap_model(model) is not self._methods_model:  # `model_init` built a new model for this run
            self._build_methods(model)

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        step = self._training_step_context(model, inputs, num_items_in_batch)
        adversary = self.adversary if step.labelled is not None and attacking else None
        regularizers = self.regularizers if attacking else []
        components = [c for c in (adversary, *regularizers) if c is not None]
        tap_context = self.tap.attached() if self.tap is not None else contextlib.nullcontext()
        method_context = adversary.capture() if adversary is not None else contextlib.nullcontext()
        with (
            self.accelerator.no_sync(model),
            tap_context,
            method_context,
            _saved_weights_context(adversary, regularizers),
        ):
            # 1. The clean pass (held, to be back-propagated with the next term unless a method needs its gradient).
            if step.labelled is not None and (adversary is None or adversary.trains_clean_pass):
                self._clean_pass(step, retain=any(r.needs_clean_graph for r in regularizers))
            # 2. The perturbation's passes.
            if adversary is not None:
                if adversary.needs_clean_gradient:
                    step.flush()
                with step.component(final=components[-1] is adversary):
                    adversary.train_step(step)
            # 3. The regularizers' terms.
            for regularizer in regularizers:
                with step.component(final=components[-1] is regularizer):
                    term = regularizer.term(step)
                    if term is not None:
                        step.backward(term)
            step.flush(sync=not components)  # with no component after it, the clean pass runs the all-reduce
            if step.wants_sync and not step.synced:
                # Every attack of this step was skipped: one cheap zero backward still runs the all-reduce that
                # the other ranks are waiting for.
                params = [p for p in model.parameters() if p.requires_grad]
                with step.component(final=True):
                    step.backward(sum(p.reshape(-1)[0] * 0.0 for p in params))
        # 4. The log: losses are recorded on the micro-batch-mean scale.
        if step.training_loss is None:  # no labelled row in this micro-batch
            return torch.zeros((), device=self.args.device)
        return (step.training_loss / step.accumulation).detach()

    def _training_step_context(self, model: nn.Module, inputs: dict, num_items_in_batch) -> TrainingStep:
        accumulation = self.current_gradient_accumulation_steps
        # The Trainer wants this micro-batch's backward to all-reduce (the last of an accumulation window under DDP).
        wants_sync = isinstance(model, DistributedDataParallel) and model.require_backward_grad_sync
        # Directions are computed from gradients under the fp16 loss scale: they do not depend on it, and scaling
        # the losses of the inner `autograd.grad` calls by it keeps fp16 gradients from underflowing as in backward.
        scaler = getattr(self.accelerator, "scaler", None)
        grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

        def backward(loss: torch.Tensor, sync: bool, retain_graph: bool) -> None:
            kwargs = {"retain_graph": True} if retain_graph else {}
            if sync and wants_sync:
                with _sync_in_backward(model, loss):
                    self.accelerator.backward(loss, **kwargs)
            else:
                self.accelerator.backward(loss, **kwargs)

        step = TrainingStep(
            self,
            model,
            inputs,
            self._labelled_rows(inputs),
            num_items_in_batch=num_items_in_batch,
            accumulation=accumulation,
            loss_is_scaled=self._loss_is_scaled_for_ga(num_items_in_batch),
            grad_scale=grad_scale,
            tap=self.tap,
            outputs_capture=self._outputs,
            distillation=self.distillation,
            backward=backward,
            record=self._record,
        )
        step.wants_sync = wants_sync
        return step

    def _clean_pass(self, step: TrainingStep, retain: bool) -> None:
        if self._outputs is not None:
            loss, step.clean_outputs = step.loss_and_outputs()
        else:
            loss = step.loss()
        if self.tap is not None:
            step.clean_shapes, step.clean_is_decoder = self.tap.output_shapes(), self.tap.output_is_decoder()
        step.training_loss = loss.detach()
        step.hold(loss, retain_graph=retain)
        self._record("clean_loss", loss)

    if _TRANSFORMERS_VERSION < (4, 47):

        def _load_rng_state(self, checkpoint):
            """transformers 4.46 loads the checkpoint's RNG state with `torch.load`'s default, weights_only=True
            since torch 2.6, which refuses its numpy arrays; 4.47 allows them as below."""
            import numpy as np

            np_core = getattr(np, "_core", None) or np.core
            allowed = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
            safe = getattr(torch.serialization, "safe_globals", None)
            with safe(allowed) if safe is not None else contextlib.nullcontext():
                return super()._load_rng_state(checkpoint)

    def _clean_training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The parent's training step with the loss divided for gradient accumulation (transformers < 4.48)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def _batch_labels(self, inputs: dict):
        """The batch's labels (the Trainer's first `label_names`, else `labels`), or None."""
        return inputs.get(self.label_names[0]) if getattr(self, "label_names", None) else inputs.get("labels")

    def _count_rows(self, inputs: dict) -> None:
        """Record the labelled and unlabelled rows of this micro-batch (logged as totals)."""
        labels = self._batch_labels(inputs)
        missing = unlabelled_rows(labels)
        rows = int(labels.shape[0]) if isinstance(labels, torch.Tensor) else 0
        unlabelled = int(missing.sum()) if missing is not None else 0
        self._record("labeled_rows", rows - unlabelled)
        self._record("unlabeled_rows", unlabelled)
        seen = getattr(self, "_rows_seen", None)
        if seen is not None:
            seen += torch.tensor([rows - unlabelled, unlabelled], dtype=torch.float64)

    def _labelled_rows(self, inputs: dict) -> dict | None:
        """The batch without its unlabelled rows (all labels -100): `inputs` itself when every row is labelled, None
        when none is."""
        labels = self._batch_labels(inputs)
        missing = unlabelled_rows(labels)
        if missing is None:
            return inputs
        if bool(missing.all()):
            return None
        return select_rows(inputs, (~missing).nonzero().squeeze(1), labels.shape[0])

    # -- logging -----------------------------------------------------------------------------------------------------
    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The parent's loop; in `evaluate()` (not `predict()`), with `robust_eval_epsilons` set, also the accuracy
        under a PGD attack on the same data, as `{prefix}_adv_accuracy@{eps}`. The attack computes no parameter
        gradient and writes no weight; each process attacks its shard and the counts are gathered."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        epsilons = self.args.robust_eval_epsilons
        if epsilons and description == "Evaluation":
            attacked = adversarial_accuracy(
                self.model,
                dataloader,
                epsilons,
                steps=self.args.robust_eval_steps,
                embedding_name=self.args.adv_embedding_name,
                gather=self.accelerator.gather_for_metrics,
                disable_tqdm=self.args.disable_tqdm or not self.is_local_process_zero(),
            )
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in attacked.items()})
        return output

    def _record(self, name: str, value: torch.Tensor | float | None) -> None:
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        self._adv_metrics[name].append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Merge the adversarial metrics into the training logs, reduced over processes, then log as the parent."""
        if "loss" in logs and (
            self.args.adversarial or self.distillation is not None or self.unlabeled_dataset is not None
        ):
            # Every rank reduces the same fixed-size tensors, whatever it recorded, so no rank waits on another.
            device = self.args.device
            names = self._metric_names
            sums = torch.zeros(len(names), device=device)
            counts = torch.zeros(len(names), device=device)
            for i, name in enumerate(names):
                recorded = self._adv_metrics.get(name)
                if recorded:
                    sums[i] = torch.stack(recorded).to(device).sum()
                    counts[i] = len(recorded)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
                counts = self.accelerator.reduce(counts, reduction="sum")
                # The `_skipped` counts are totals over all processes; the others are means.
            for i, name in enumerate(names):
                if counts[i] > 0:
                    value = sums[i] if name in self._summed_metrics else sums[i] / counts[i]
                    logs[name] = round(float(value), 6)
            self._adv_metrics.clear()
        super().log(logs, *args, **kwargs)


class AdversarialTrainer(AdversarialMixin, Trainer):
    """A drop-in `Trainer` whose training step adds an adversarial pass and a VAT term: `AdversarialMixin` on
    `transformers.Trainer` (see `AdversarialMixin` for what it does, logs and refuses)."""
