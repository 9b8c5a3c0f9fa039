"""Worker for tests/test_ddp.py: trains a tiny BERT with `AdversarialTrainer` in every scenario and saves the results.

Two modes, same scenarios, same data:

* distributed: ``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py --out ddp.pt`` (CPU, gloo). Each
  scenario trains with per-device batch 2 and `gradient_accumulation_steps=ga`; a DDP communication hook counts
  the all-reduces.
* single process: ``python tests/ddp_worker.py --single --out single.pt``. Each scenario trains with batch 2 and
  `gradient_accumulation_steps=2 * ga`, the same optimization: accelerate's `BatchSamplerShard` gives rank r the
  batches r, r + 2, r + 4, ... of the sampler, which is the same `SeedableRandomSampler` (seeded by
  `TrainingArguments.seed` through `set_seed` in `Trainer.__init__`) in both modes, so optimizer step k of the DDP
  run sees exactly the micro-batches of step k of the single run. The test checks this from the recorded batches.
  Micro-batch m of a step of the single run stands for rank m % 2 (its "virtual rank"): the skip scenarios and
  VAT's deterministic random start key on it.

The robust-evaluation scenarios (`ROBUST_EVAL_SCENARIOS`, run only when named with ``--scenarios``) train nothing:
the same tiny model runs `evaluate()` with `robust_eval_epsilons` (and `predict()`) on an eval set of a given size, per
device batch 2, in both modes; the per-example rows that the robustness evaluation gathers are recorded.

Rank 0 (or the single process) rewrites the output file after every scenario, so that a scenario that hangs does not
lose the results of the ones before it; the skip scenarios, the likeliest to hang, run last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests' tiny BERT; this script's folder (tests/) is first on sys.path when it runs.
import reference  # noqa: E402
from conftest import VOCAB, leave_process_group, tiny_model  # noqa: E402

import hf_adv.methods.awp as awp_module  # noqa: E402
import hf_adv.methods.fgm as fgm_module  # noqa: E402
import hf_adv.methods.pgd as pgd_module  # noqa: E402
import hf_adv.robustness as robustness_module  # noqa: E402
import hf_adv.trainer as trainer_module  # noqa: E402
from hf_adv import AdversarialTrainer, AdversarialTrainingArguments, list_methods  # noqa: E402
from hf_adv.methods.base import is_usable_norm  # noqa: E402
from hf_adv.methods.vat import VAT  # noqa: E402

WORLD = 2  # processes of the distributed run; micro-batches per step of the single run (times ga)
BATCH = 2  # per-device batch size
STEPS = 3  # optimizer steps, exactly one epoch
SEQ_LEN = 10

# Every registered method with its first case in tests/reference.py, and a perturbation with a regularizer. A method
# that carries its perturbation over between micro-batches (carry) is left out: each rank carries its own, which the
# single process, one perturbation for all its micro-batches, cannot stand for.
METHODS = {"none": {}}
for _name in list_methods(None):
    if reference.first_case(_name).steps == 1:
        METHODS[_name] = {**reference.first_case(_name).flags, "adv_start_epoch": 0.0}
METHODS["fgm+vat"] = {"adv_method": "fgm", "adv_epsilon": 0.5, "vat_weight": 1.0}
# Defensive distillation, alone and with FGM: the teacher is `teacher()`, passed as `teacher_model`.
METHODS["distill"] = {"distill_temperature": 5.0, "distill_hard_weight": 0.5}
METHODS["fgm+distill"] = {"adv_method": "fgm", "adv_epsilon": 0.5, "adv_start_epoch": 0.0, **METHODS["distill"]}


def teacher():
    """The distillation scenarios' teacher: a tiny BERT of other weights than the student's."""
    return tiny_model(seed=5)


# DDP settings: hf_adv's default for a transformers model that uses every parameter (`ddp_find_unused_parameters`
# unset: `find_unused_parameters=False`, no graph search, buckets rebuilt after step 1) and
# `ddp_find_unused_parameters=True` (the parent Trainer's default: DDP searches each backward's graph).
DDP_CONFIGS = {"default-ddp": None, "find-unused": True}
# What DistributedDataParallel is given for each.
DDP_FIND_UNUSED = {"default-ddp": False, "find-unused": True}

# Skip scenarios: the attack named is skipped on rank 1 only, as for a NaN gradient norm there.
SKIPS = {
    "fgm/ga1/skip-adv": ("fgm", 1, ("adv",)),
    "pgd/ga2/skip-adv": ("pgd", 2, ("adv",)),
    "awp/ga1/skip-adv": ("awp", 1, ("adv",)),
    "fgm+vat/ga1/skip-vat": ("fgm+vat", 1, ("vat",)),
    "fgm+vat/ga1/skip-adv+vat": ("fgm+vat", 1, ("adv", "vat")),
}


def scenarios() -> dict[str, dict]:
    """name -> {method, ga (of the DDP run), skip, ddp (key of DDP_CONFIGS), reference (name in the single run)}."""
    trainings = {f"{m}/ga{ga}": (m, ga, ()) for ga in (1, 2) for m in METHODS}
    out = {}
    for group in (trainings, SKIPS):  # the skip scenarios last
        for ddp in DDP_CONFIGS:
            for single, (method, ga, skip) in group.items():
                name = f"{single}/{ddp}"
                out[name] = {"method": method, "ga": ga, "skip": skip, "ddp": ddp, "reference": single}
    return out


SCENARIOS = scenarios()
REFERENCES = {s["reference"]: s for s in SCENARIOS.values() if s["ddp"] == "default-ddp"}

# Robust evaluation: `evaluate()` on eval sets of these sizes, per-device batch BATCH (WORLD * BATCH = 4 examples per
# gathered batch): one divisible size, and each remainder, so that `gather_for_metrics` has 1, 2 or 3 examples to
# keep of the last gathered batch (with 13, rank 0's last batch is half padding and rank 1's all padding).
ROBUST_EVAL_EPSILONS = (0.01, 0.03, 10.0)  # the tiny random model: some examples fooled, most, and all
ROBUST_EVAL_STEPS = 3
ROBUST_EVAL_SCENARIOS = {f"robust-eval/n{n}": {"eval_size": n} for n in (16, 13, 14, 15)}


class Context:
    """What the patched functions below need to know about the micro-batch being trained."""

    virtual_rank = 0
    skip: tuple[str, ...] = ()
    input_ids: torch.Tensor | None = None

    @classmethod
    def skipping(cls, what: str) -> bool:
        return cls.virtual_rank == 1 and what in cls.skip


def deterministic_noise(self, shape, like):
    """VAT's random start as a function of the input ids; NaN on a rank whose VAT is to be skipped."""
    if Context.skipping("vat"):
        return torch.full(shape, float("nan"), device=like.device)
    ids = Context.input_ids.detach().cpu().long()
    seed = int((ids * torch.arange(1, ids.numel() + 1).view_as(ids)).sum()) % (2**31)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


def usable_norm_unless_skipped(norm):
    """`is_usable_norm`, but False (as for a NaN gradient norm) on a rank whose attack is to be skipped."""
    return False if Context.skipping("adv") else is_usable_norm(norm)


class RobustGathers:
    """What `adversarial_accuracy` gathered, call by call: the per-example rows `gather` returned for each batch."""

    calls: list[dict] = []


_adversarial_accuracy = robustness_module.adversarial_accuracy


def recording_adversarial_accuracy(*args, gather=None, **kwargs):
    """`adversarial_accuracy`, recording the rows its `gather` returns (patched where the trainer looks it up)."""
    call = {"gather": gather is not None, "rows": []}
    RobustGathers.calls.append(call)

    def recording_gather(data):
        gathered = gather(data)
        call["rows"].append(gathered.detach().cpu().clone())
        return gathered

    return _adversarial_accuracy(*args, gather=recording_gather if gather is not None else None, **kwargs)


def install_patches() -> None:
    """Make VAT's random start deterministic, let `Context` skip attacks, and record what the robust evaluation
    gathers (called by `main` only, so that the test can import this module for its scenario table without patching
    hf_adv in the pytest process)."""
    VAT.sample_noise = deterministic_noise
    for module in (fgm_module, pgd_module, awp_module):
        module.is_usable_norm = usable_norm_unless_skipped
    robustness_module.adversarial_accuracy = recording_adversarial_accuracy
    trainer_module.adversarial_accuracy = recording_adversarial_accuracy  # the trainer's own reference to it


class RecordingTrainer(AdversarialTrainer):
    """Records the micro-batches it trains on and counts backward passes."""

    def __init__(self, *args, skip: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = skip
        self.batches: list[list[list[int]]] = []
        self.backward_calls = 0
        backward = self.accelerator.backward

        def counting_backward(loss, **kw):
            self.backward_calls += 1
            return backward(loss, **kw)

        self.accelerator.backward = counting_backward

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.world_size > 1:
            Context.virtual_rank = self.args.process_index
        else:
            Context.virtual_rank = len(self.batches) % WORLD
        Context.skip = self.skip
        Context.input_ids = inputs["input_ids"]
        self.batches.append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


class CommHookCounter(TrainerCallback):
    """At train begin, once the Trainer has wrapped the model in DDP, registers a communication hook that counts the
    all-reduces and then runs the default one."""

    def __init__(self):
        self.trainer: AdversarialTrainer | None = None
        self.wrapped_at_train_begin: str | None = None
        self.find_unused_parameters: bool | None = None
        self.calls = 0  # one per gradient bucket reduced
        self.bucket0_calls = 0  # one per all-reduce of the whole gradient
        self.bucket0_calls_per_step: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        self.wrapped_at_train_begin = type(model).__name__
        self.find_unused_parameters = getattr(model, "find_unused_parameters", None)
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(state=None, hook=self.hook)

    def hook(self, state, bucket):
        self.calls += 1
        self.bucket0_calls += int(bucket.index() == 0)
        return allreduce_hook(None, bucket)

    def on_step_end(self, args, state, control, **kwargs):
        self.bucket0_calls_per_step.append(self.bucket0_calls - sum(self.bucket0_calls_per_step))


def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    """Random token ids, padded (id 0) at the end to random lengths, random binary labels."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(n)]


def run_scenario(scenario: dict, distributed: bool, output_dir: str) -> dict:
    ga = scenario["ga"]
    args = AdversarialTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ga if distributed else ga * WORLD,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
        ddp_find_unused_parameters=DDP_CONFIGS[scenario["ddp"]],
        **METHODS[scenario["method"]],
    )
    counter = CommHookCounter()
    extra = {"teacher_model": teacher()} if "distill" in scenario["method"] else {}
    trainer = RecordingTrainer(
        model=tiny_model(),
        args=args,
        **extra,
        train_dataset=dataset(STEPS * WORLD * ga * BATCH),
        callbacks=[counter],
        skip=scenario["skip"],
    )
    counter.trainer = trainer
    trainer.train()
    return {
        "weights": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "batches": trainer.batches,
        "backward_calls": trainer.backward_calls,
        "global_step": trainer.state.global_step,
        "wrapped_at_train_begin": counter.wrapped_at_train_begin,
        "find_unused_parameters": counter.find_unused_parameters,
        "hook_calls": counter.calls,
        "hook_bucket0_calls": counter.bucket0_calls,
        "hook_bucket0_calls_per_step": counter.bucket0_calls_per_step,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }


def clean_accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def run_robust_eval(scenario: dict, output_dir: str) -> dict:
    """`evaluate()` with `robust_eval_epsilons`, then `predict()`, on an eval set of `eval_size` examples."""
    args = AdversarialTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        per_device_eval_batch_size=BATCH,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
        robust_eval_epsilons=list(ROBUST_EVAL_EPSILONS),
        robust_eval_steps=ROBUST_EVAL_STEPS,
    )
    trainer = AdversarialTrainer(model=tiny_model(), args=args, compute_metrics=clean_accuracy)
    eval_dataset = dataset(scenario["eval_size"])
    RobustGathers.calls = []
    metrics = trainer.evaluate(eval_dataset)
    evaluate_gathers = RobustGathers.calls
    RobustGathers.calls = []
    prediction = trainer.predict(eval_dataset)
    return {
        "metrics": metrics,
        "robust_gathers": evaluate_gathers,
        "predict_robust_gathers": len(RobustGathers.calls),
        "predict_metrics": prediction.metrics,
        "predict_logits": torch.as_tensor(prediction.predictions),
        "predict_labels": torch.as_tensor(prediction.label_ids),
        "labels": torch.stack([example["labels"] for example in eval_dataset]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="results file (torch.save of a dict)")
    parser.add_argument("--single", action="store_true", help="single-process reference run")
    parser.add_argument(
        "--scenarios", nargs="*", help="names to run (default: every training scenario; robust-eval/* when named)"
    )
    cli = parser.parse_args()
    install_patches()
    torch.set_num_threads(1)
    distributed = not cli.single
    rank = 0
    if distributed:
        # A collective that the other rank never joins raises after this timeout instead of hanging.
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank = dist.get_rank()
        assert dist.get_world_size() == WORLD, dist.get_world_size()
    todo = cli.scenarios or list(SCENARIOS if distributed else REFERENCES)
    table = {**(SCENARIOS if distributed else REFERENCES), **ROBUST_EVAL_SCENARIOS}

    results: dict = {"distributed": distributed, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in todo:
            try:
                output_dir = os.path.join(tmp, name.replace("/", "_"))
                if name in ROBUST_EVAL_SCENARIOS:
                    result = run_robust_eval(table[name], output_dir)
                else:
                    result = run_scenario(table[name], distributed, output_dir)
            except Exception:
                traceback.print_exc()
                result = {"error": traceback.format_exc()}
            per_rank = [None] * WORLD if distributed else [result]
            if distributed:
                dist.all_gather_object(per_rank, result)
            if rank == 0:
                results["scenarios"][name] = per_rank
                torch.save(results, cli.out + ".tmp")
                os.replace(cli.out + ".tmp", cli.out)
                status = "failed" if any("error" in r for r in per_rank) else "done"
                print(f"[ddp_worker] {name}: {status}", flush=True)
    if distributed:
        leave_process_group()


if __name__ == "__main__":
    main()
