"""Shared fixtures: a tiny BERT built from a config (no download), batches of random token ids, trainer factory."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_adv import AdversarialTrainer, AdversarialTrainingArguments

VOCAB = 99


def leave_process_group() -> None:
    """The end of a test's DDP worker script: both ranks leave together, the process group is torn down, and the
    interpreter's own teardown is skipped. A gloo thread still alive at interpreter exit aborts the process
    ("terminate called without an active exception", SIGABRT, exit code -6): seen in CI after every check of the
    script had passed, even with `destroy_process_group`. Output is flushed first; a failure before this call still
    exits non-zero with its traceback."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_config(**overrides) -> BertConfig:
    config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    config.update(overrides)
    return BertConfig(**config)


def tiny_model(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**overrides))


def make_batch(batch_size: int = 4, seq_len: int = 10, seed: int = 1, multi_label: bool = False, num_labels: int = 2):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
    input_ids[:, -2:] = 0  # padding at the end, to exercise padding_idx
    attention_mask = (input_ids != 0).long()
    if multi_label:
        labels = torch.randint(0, 2, (batch_size, num_labels), generator=g).float()
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_dataset(n: int = 16, seq_len: int = 10, seed: int = 1, **kw) -> Dataset:
    batch = make_batch(n, seq_len, seed, **kw)
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def training_args(tmp_path, cls=AdversarialTrainingArguments, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(cls)}:
        # transformers >= 5: batches in dataset order. 4.x has no such field and always shuffles, with accelerate's
        # SeedableRandomSampler seeded from `seed`: the same order in every run with the same seed.
        defaults["train_sampling_strategy"] = "sequential"
    if cls is AdversarialTrainingArguments:
        defaults["adv_start_epoch"] = 0.0
    defaults.update(overrides)
    return cls(**defaults)


def make_trainer(
    tmp_path,
    model=None,
    dataset=None,
    plain: bool = False,
    teacher=None,
    eval_dataset=None,
    unlabeled_dataset=None,
    **overrides,
):
    model = model if model is not None else tiny_model()
    dataset = dataset if dataset is not None else make_dataset()
    if plain:
        return Trainer(
            model=model, args=training_args(tmp_path, TrainingArguments, **overrides), train_dataset=dataset
        )
    extra = {"teacher_model": teacher} if teacher is not None else {}
    if eval_dataset is not None:
        extra["eval_dataset"] = eval_dataset
    if unlabeled_dataset is not None:
        extra["unlabeled_dataset"] = unlabeled_dataset
    return AdversarialTrainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=dataset, **extra)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close_dicts(actual: dict, expected: dict, atol: float = 1e-5, rtol: float = 1e-4):
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


def assert_equal_dicts(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs"


class Recorder(TrainerCallback):
    """Keeps every dict passed to `on_log`, as a `report_to` integration receives it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture
def deterministic_vat_noise(monkeypatch):
    """VAT's random start as a function of the batch shape only, so runs can be compared."""
    from hf_adv.methods.vat import VAT

    def noise(self, shape, like):
        g = torch.Generator().manual_seed(1234)
        return torch.randn(shape, generator=g).to(like.device)

    monkeypatch.setattr(VAT, "sample_noise", noise)
    return noise


__all__ = ["copy"]


@pytest.fixture(autouse=True)
def sequential_batches_on_transformers_4(monkeypatch):
    """Batches in dataset order, as `train_sampling_strategy="sequential"` gives from transformers 5; 4.x has no such
    field and always shuffles (seeded), so which examples share a micro-batch would depend on the seed."""
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:

        def sequential(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        monkeypatch.setattr(Trainer, "_get_train_sampler", sequential)
