"""`AdversarialTrainer`: `transformers.Trainer` with FGM, FGSM, PGD or AWP and a VAT term in every training step.

Data flow: `AdversarialTrainingArguments` (flat `adv_*`, `awp_*`, `vat_*` fields) -> `AdversarialTrainer.__init__`
builds one method object from `hf_adv.methods` (and a `VAT`) -> `training_step` runs, for each micro-batch:

1. the clean forward and backward, its gradient captured by the method;
2. the adversarial pass inside `method.perturbed()`, whose gradient adds to the clean one;
3. the VAT pass, whose gradient adds too.

Every backward but the last runs under `accelerator.no_sync`, and the last one triggers the DDP all-reduce, so
gradients are reduced once per optimizer step whatever the number of passes.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer
from transformers.utils import logging

from .arguments import AdversarialTrainingArguments
from .embedding import unwrap_model
from .losses import MULTI_LABEL, SINGLE_LABEL, has_missing_labels, infer_problem_type, masked_classification_loss
from .methods import VAT, AdversarialMethod, get_method_class

logger = logging.get_logger(__name__)

# Logged with the training loss: means over the micro-batches since the last log, except the `_skipped` counts.
METRICS = ("clean_loss", "adv_loss", "adv_perturbation_norm", "adv_skipped", "vat_loss", "vat_skipped")
SUMMED_METRICS = ("adv_skipped", "vat_skipped")


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs[1] if len(outputs) > 1 else outputs[0]


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


class AdversarialTrainer(Trainer):
    """A drop-in `Trainer` whose training step adds an adversarial pass and a VAT term.

    Takes the same arguments as `transformers.Trainer`; `args` must be an `AdversarialTrainingArguments`. With
    `adv_method="none"` and `vat_weight=0` the training step is the parent's, untouched.

    Logged with the training loss, to every `report_to` integration: `clean_loss`, `adv_loss`, `vat_loss` (means
    over the micro-batches since the last log), `adv_perturbation_norm`, and `adv_skipped` / `vat_skipped` (attacks
    skipped because the gradient norm was 0, NaN or Inf). The reported `loss` stays the clean loss, comparable with
    a plain `Trainer` run.
    """

    # The clean, adversarial and VAT losses are per-micro-batch means: `training_step` divides each by the number of
    # accumulated micro-batches.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: AdversarialTrainingArguments | None = None, *a, **kw):
        if args is None:
            args = AdversarialTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, AdversarialTrainingArguments):
            raise TypeError(
                f"AdversarialTrainer needs `args` of type AdversarialTrainingArguments, got {type(args).__name__}; "
                "build it with the same fields plus adv_method=..., or use transformers.Trainer for plain training."
            )
        super().__init__(model, args, *a, **kw)
        # Models whose forward takes **kwargs are otherwise given `num_items_in_batch` and trusted to divide by it,
        # which sequence-classification heads do not do: gradient accumulation would then sum instead of average.
        self.model_accepts_loss_kwargs = False
        self._check_supported()
        self.adversary: AdversarialMethod | None = None
        self.vat: VAT | None = None
        self._methods_model: nn.Module | None = None
        self._build_methods(self.model)
        self._adv_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        start = self.args.resolved_start_epoch
        if self.args.adversarial and self.args.max_steps <= 0 and start >= self.args.num_train_epochs:
            logger.warning(
                f"adv_start_epoch={start} is not before num_train_epochs={self.args.num_train_epochs}: the "
                f"{self.args.adv_method} attack and VAT will never run. Lower adv_start_epoch or train longer."
            )

    # -- set-up ------------------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        args = self.args
        if not args.adversarial:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            engine = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
            raise ValueError(
                f"adv_method={args.adv_method!r} with vat_weight={args.vat_weight} runs several backward passes per "
                f"micro-batch and perturbs weights in place, which {engine} (sharded parameters and gradients) does "
                "not allow here. Use DDP (`accelerate launch --multi_gpu`) or adv_method='none' with vat_weight=0."
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
        if args.vat_weight > 0:
            config = getattr(unwrap_model(self.model), "config", None)
            problem_type = getattr(config, "problem_type", None)
            if getattr(config, "num_labels", 2) == 1 or problem_type == "regression":
                raise ValueError(
                    f"vat_weight={args.vat_weight} needs a classification model (softmax or multi-label sigmoid "
                    f"outputs); this one has num_labels={getattr(config, 'num_labels', None)}, "
                    f"problem_type={problem_type!r}."
                )

    def _build_methods(self, model: nn.Module) -> None:
        args = self.args
        if args.adv_method != "none":
            cls = get_method_class(args.adv_method)
            kwargs = {
                "fgm": {"epsilon": args.adv_epsilon},
                "fgsm": {"epsilon": args.adv_epsilon},
                "pgd": {"epsilon": args.adv_epsilon, "alpha": args.adv_alpha, "steps": args.adv_steps},
                "awp": {
                    "lr": args.awp_lr,
                    "eps": args.awp_eps,
                    "param_pattern": args.awp_param_pattern,
                    "discard_clean_grad": args.awp_discard_clean_grad,
                },
            }.get(args.adv_method, {})
            self.adversary = cls(model, embedding_name=args.adv_embedding_name, attach=False, **kwargs)
        if args.vat_weight > 0:
            shared_tap = self.adversary.tap if self.adversary is not None else None
            self.vat = VAT(
                model,
                epsilon=args.vat_epsilon,
                xi=args.vat_xi,
                iterations=args.vat_iterations,
                embedding_name=args.adv_embedding_name,
                attach=False,
                tap=shared_tap,
            )
        self._methods_model = unwrap_model(model)

    def _attack_active(self) -> bool:
        epoch = self.state.epoch or 0.0
        return self.state.global_step >= self.args.adv_start_step and epoch >= self.args.resolved_start_epoch

    # -- loss --------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The parent's loss, except that examples labelled -100 (all -100 for multi-label) are left out of the
        supervised loss instead of producing NaN (single-label) or a wrong BCE target (multi-label)."""
        labels = inputs.get("labels")
        if (
            not torch.is_tensor(labels)
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or not has_missing_labels(labels)
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        problem_type = infer_problem_type(getattr(unwrap_model(model), "config", None), labels)
        if problem_type not in (SINGLE_LABEL, MULTI_LABEL):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = masked_classification_loss(_logits(outputs), labels, problem_type)
        return (loss, outputs) if return_outputs else loss

    # -- the training step -------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        active = self.args.adversarial and self._attack_active()
        if not active:
            return super().training_step(model, inputs, num_items_in_batch)
        if unwrap_model(model) is not self._methods_model:  # `model_init` built a new model for this run
            self._build_methods(model)

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1)
        # The Trainer wants this micro-batch's backward to all-reduce (the last of an accumulation window under DDP).
        wants_sync = isinstance(model, DistributedDataParallel) and model.require_backward_grad_sync
        # Directions are computed from gradients under the fp16 loss scale: they do not depend on it, and scaling
        # the losses of the inner `autograd.grad` calls by it keeps fp16 gradients from underflowing as in backward.
        scaler = getattr(self.accelerator, "scaler", None)
        grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        adversary = self.adversary
        tap = adversary.tap if adversary is not None and adversary.tap is not None else None
        tap = tap or (self.vat.tap if self.vat is not None else None)
        synced = False

        def backward(loss: torch.Tensor, last: bool) -> None:
            nonlocal synced
            if last and wants_sync:
                with _sync_in_backward(model, loss):
                    self.accelerator.backward(loss)
                synced = True
            else:
                self.accelerator.backward(loss)

        def forward_loss() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        method_context = adversary.capture() if adversary is not None else contextlib.nullcontext()
        tap_context = tap.attached() if tap is not None else contextlib.nullcontext()
        with self.accelerator.no_sync(model), tap_context, method_context:
            with self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            clean_logits = _logits(outputs).detach() if self.vat is not None else None
            del outputs
            backward(loss / accumulation, last=False)
            self._record("clean_loss", loss)

            if adversary is not None:

                def closure() -> torch.Tensor:
                    return forward_loss() * grad_scale

                with adversary.perturbed(closure) as attack:
                    self._record("adv_skipped", torch.tensor(float(attack.skipped)))
                    if not attack.skipped:
                        adv_loss = forward_loss()
                        backward(adv_loss / accumulation, last=self.vat is None)
                        self._record("adv_loss", adv_loss)
                        self._record("adv_perturbation_norm", attack.norm)

            if self.vat is not None:
                vat_loss = self._vat_loss(model, inputs, clean_logits, grad_scale)
                if vat_loss is not None:
                    backward(self.args.vat_weight * vat_loss / accumulation, last=True)

            if wants_sync and not synced:
                # Every attack of this step was skipped: one cheap zero backward still runs the all-reduce that
                # the other ranks are waiting for.
                params = [p for p in model.parameters() if p.requires_grad]
                backward(sum(p.reshape(-1)[0] * 0.0 for p in params), last=True)

        return (loss / accumulation).detach()

    def _vat_loss(self, model, inputs: dict, clean_logits: torch.Tensor, grad_scale: float) -> torch.Tensor | None:
        unlabelled_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        problem_type = infer_problem_type(getattr(unwrap_model(model), "config", None), inputs.get("labels"))

        def forward() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return _logits(model(**unlabelled_inputs))

        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("VAT perturbs the input embeddings and needs `input_ids` in the batch.")
        r_adv = self.vat.adversarial_direction(forward, clean_logits, tuple(input_ids.shape), problem_type, grad_scale)
        self._record("vat_skipped", torch.tensor(float(r_adv is None)))
        if r_adv is None:
            return None
        vat_loss = self.vat.loss(forward, clean_logits, r_adv, problem_type)
        self._record("vat_loss", vat_loss)
        return vat_loss

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
            # Imported here: a module-level import would make `python -m hf_adv.robustness` warn that the module was
            # imported (through `hf_adv`) before it ran.
            from .robustness import adversarial_accuracy

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

    def _record(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self._adv_metrics[name].append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the adversarial metrics into the training logs, reduced over processes, then log as the parent."""
        if "loss" in logs and self.args.adversarial:
            # Every rank reduces the same fixed-size tensors, whatever it recorded, so no rank waits on another.
            device = self.args.device
            sums = torch.zeros(len(METRICS), device=device)
            counts = torch.zeros(len(METRICS), device=device)
            for i, name in enumerate(METRICS):
                recorded = self._adv_metrics.get(name)
                if recorded:
                    sums[i] = torch.stack(recorded).to(device).sum()
                    counts[i] = len(recorded)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
                counts = self.accelerator.reduce(counts, reduction="sum")
                # `adv_skipped` and `vat_skipped` are totals over all processes; the others are means.
            for i, name in enumerate(METRICS):
                if counts[i] > 0:
                    value = sums[i] if name in SUMMED_METRICS else sums[i] / counts[i]
                    logs[name] = round(float(value), 6)
            self._adv_metrics.clear()
        super().log(logs, start_time)
