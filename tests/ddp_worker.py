"""Worker for tests/test_ddp.py: trains a tiny BERT with `AdversarialTrainer` for every scenario and saves the results.

Two modes, same scenarios, same data:

* distributed: ``torchrun --nproc_per_node 2 tests/ddp_worker.py --out results.pt`` (CPU, gloo). Each scenario trains
  with per-device batch 2 and `gradient_accumulation_steps=ga`. A DDP communication hook counts the all-reduces.
* single process: ``python tests/ddp_worker.py --single --out reference.pt``. Each scenario trains with per-device
  batch 2 and `gradient_accumulation_steps=2 * ga`, which is the same optimization: accelerate's
  `BatchSamplerShard` gives rank r the global batches r, r + 2, r + 4, ... of the (identically seeded) sampler, so
  an optimizer step of the DDP run sees exactly the micro-batches of one step of the single run. Micro-batch m of a
  step of the single run plays the part of rank m % 2 ("virtual rank"), which is what the skip scenarios and the
  deterministic VAT noise key on.

Rank 0 (or the single process) rewrites the output file after every scenario, so a scenario that hangs does not
lose the results of the ones before it.
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
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_adv.methods.awp as awp_module  # noqa: E402
import hf_adv.methods.fgm as fgm_module  # noqa: E402
import hf_adv.methods.pgd as pgd_module  # noqa: E402
from hf_adv import AdversarialTrainer, AdversarialTrainingArguments  # noqa: E402
from hf_adv.methods.base import is_usable_norm  # noqa: E402
from hf_adv.methods.vat import VAT  # noqa: E402

WORLD = 2  # processes of the distributed run, micro-batches per step of the single run (times ga)
BATCH = 2  # per-device batch size
STEPS = 3  # optimizer steps
SEQ_LEN = 10
VOCAB = 99

METHODS = {
    "none": {},
    "fgm": {"adv_method": "fgm", "adv_epsilon": 0.5},
    "fgsm": {"adv_method": "fgsm", "adv_epsilon": 0.02},
    "pgd": {"adv_method": "pgd", "adv_epsilon": 0.5, "adv_alpha": 0.3, "adv_steps": 3},
    "awp": {"adv_method": "awp", "awp_lr": 1.0, "awp_eps": 1e-2, "adv_start_epoch": 0.0},
    "fgm+vat": {"adv_method": "fgm", "adv_epsilon": 0.5, "vat_weight": 1.0},
}

# name -> (method, gradient accumulation of the DDP run, attacks skipped on rank 1: "adv" and/or "vat")
SCENARIOS: dict[str, tuple[str, int, tuple[str, ...]]] = {}
for _method in METHODS:
    SCENARIOS[f"{_method}/ga1"] = (_method, 1, ())
for _method in METHODS:
    SCENARIOS[f"{_method}/ga2"] = (_method, 2, ())
# Last, so that a hang there cannot hide the results above. The attack is skipped on rank 1 only; with nothing
# left to back-propagate after the clean pass, rank 1 must still join the all-reduce that rank 0 starts.
SCENARIOS["fgm/ga1/skip-adv-rank1"] = ("fgm", 1, ("adv",))
SCENARIOS["pgd/ga2/skip-adv-rank1"] = ("pgd", 2, ("adv",))
SCENARIOS["awp/ga1/skip-adv-rank1"] = ("awp", 1, ("adv",))
SCENARIOS["fgm+vat/ga1/skip-vat-rank1"] = ("fgm+vat", 1, ("vat",))
SCENARIOS["fgm+vat/ga1/skip-adv+vat-rank1"] = ("fgm+vat", 1, ("adv", "vat"))


class Context:
    """What the patched functions below need to know about the micro-batch being trained."""

    virtual_rank = 0
    skip: tuple[str, ...] = ()
    input_ids: torch.Tensor | None = None

    @classmethod
    def skipping(cls, what: str) -> bool:
        return cls.virtual_rank == 1 and what in cls.skip


def deterministic_noise(self, shape, like):
    """VAT's random start as a function of the input ids (NaN on a rank whose VAT is to be skipped)."""
    if Context.skipping("vat"):
        return torch.full(shape, float("nan"), device=like.device)
    ids = Context.input_ids.detach().cpu().long()
    seed = int((ids * torch.arange(1, ids.numel() + 1).view_as(ids)).sum()) % (2**31)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


def usable_norm_unless_skipped(norm):
    """`is_usable_norm`, but False (as for a NaN gradient norm) on a rank whose attack is to be skipped."""
    return False if Context.skipping("adv") else is_usable_norm(norm)


VAT.sample_noise = deterministic_noise
for _module in (fgm_module, pgd_module, awp_module):
    _module.is_usable_norm = usable_norm_unless_skipped


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
    """Registers, once the model is wrapped in DDP, a communication hook that counts all-reduces and then performs
    the default one."""

    def __init__(self):
        self.trainer = None
        self.wrapped_at_train_begin = None
        self.calls = 0  # one per gradient bucket reduced
        self.bucket0_calls = 0  # one per all-reduce of the whole gradient
        self.calls_per_step: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        self.wrapped_at_train_begin = isinstance(model, DistributedDataParallel)
        if self.wrapped_at_train_begin:
            model.register_comm_hook(state=None, hook=self.hook)

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls += 1
        self.bucket0_calls += int(bucket.index() == 0)
        return allreduce_hook(None, bucket)

    def on_step_end(self, args, state, control, **kwargs):
        self.calls_per_step.append(self.bucket0_calls - sum(self.calls_per_step))


def tiny_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # padding (id 0) at the end
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(n)]


def run_scenario(name: str, distributed: bool, output_dir: str, find_unused: bool | None = None) -> dict:
    method, ga, skip = SCENARIOS[name]
    accumulation = ga if distributed else ga * WORLD
    n = STEPS * WORLD * ga * BATCH  # exactly one epoch
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
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
        ddp_find_unused_parameters=find_unused,
        **METHODS[method],
    )
    counter = CommHookCounter()
    trainer = RecordingTrainer(model=tiny_model(), args=args, train_dataset=dataset(n), callbacks=[counter], skip=skip)
    counter.trainer = trainer
    trainer.train()
    return {
        "weights": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "batches": trainer.batches,
        "backward_calls": trainer.backward_calls,
        "global_step": trainer.state.global_step,
        "wrapped_at_train_begin": counter.wrapped_at_train_begin,
        "hook_calls": counter.calls,
        "hook_bucket0_calls": counter.bucket0_calls,
        "hook_calls_per_step": counter.calls_per_step,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true", help="single-process reference run")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--find-unused", choices=["default", "true", "false"], default="default")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    distributed = not cli.single
    rank = 0
    if distributed:
        # A collective that the other rank never joins raises after this timeout instead of hanging.
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank = dist.get_rank()
        assert dist.get_world_size() == WORLD, dist.get_world_size()

    results: dict = {"world_size": WORLD if distributed else 1, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cli.scenarios:
            try:
                find_unused = {"default": None, "true": True, "false": False}[cli.find_unused]
                result = run_scenario(name, distributed, os.path.join(tmp, name.replace("/", "_")), find_unused)
            except Exception:
                traceback.print_exc()
                result = {"error": traceback.format_exc()}
            if distributed:
                per_rank = [None] * WORLD
                dist.all_gather_object(per_rank, result)
            else:
                per_rank = [result]
            if rank == 0:
                results["scenarios"][name] = per_rank
                torch.save(results, cli.out + ".tmp")
                os.replace(cli.out + ".tmp", cli.out)
                print(f"[ddp_worker] {name}: done", flush=True)
            if any("error" in r for r in per_rank):
                break  # a failed collective can leave the process group unusable
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
