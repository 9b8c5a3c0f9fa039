"""Semi-supervised VAT: unlabelled rows mixed into the batches (`hf_adv.semi_supervised`, `unlabeled_dataset=`)."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import assert_close_dicts, grads, make_batch, make_dataset, make_trainer, tiny_model, training_args
from datasets import Dataset, DatasetDict
from transformers import BatchEncoding, TrainingArguments

from hf_adv import AdversarialTrainer
from hf_adv.semi_supervised import MixedExample, UnlabeledMixCollator, UnlabeledMixDataset

FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


def unlabelled(n: int = 6, seed: int = 2, seq_len: int = 10) -> Dataset:
    return make_dataset(n, seq_len=seq_len, seed=seed).remove_columns("labels")


# -- the mixed dataset ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 2.5, 3.0, 0.5])
def test_every_unlabelled_row_is_used_once_before_any_is_used_again(ratio):
    labelled = [{"i": i} for i in range(10)]
    pool = [{"u": j} for j in range(7)]
    mixed = UnlabeledMixDataset(labelled, pool, ratio, seed=3)
    assert len(mixed) == 10 and mixed.per_epoch() == int(10 * ratio)
    stream = []
    for epoch in range(3):
        mixed.begin_epoch(epoch)
        order = torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).tolist()  # any sampler order
        items = {i: mixed[i] for i in order}
        for i in range(10):
            assert isinstance(items[i], MixedExample) and items[i][0] == {"i": i}
            if ratio == int(ratio):
                assert len(items[i]) == 1 + int(ratio)
        stream += [u["u"] for i in range(10) for u in items[i][1:]]
    assert len(stream) == 3 * int(10 * ratio)
    for start in range(0, len(stream) - 6, 7):  # each cycle through the pool is a permutation of it
        assert sorted(stream[start : start + 7]) == list(range(7))


def test_unlabelled_rows_depend_on_the_seed_and_the_epoch_only():
    labelled, pool = list(range(8)), list(range(100, 140))
    a, b, c = (UnlabeledMixDataset(labelled, pool, 2.0, seed=s) for s in (0, 0, 1))
    assert [a[i] for i in range(8)] == [b[i] for i in range(8)]  # reproducible (any worker, any process)
    assert [a[i] for i in range(8)] != [c[i] for i in range(8)]
    first = [a[i] for i in range(8)]
    a.begin_epoch(1)
    assert [a[i] for i in range(8)] != first


@pytest.mark.parametrize(
    "labelled, unlabelled_rows, ratio, message",
    [
        ([1], [], 1.0, "unlabeled_dataset is empty"),
        ([], [1], 1.0, "labelled training dataset is empty"),
        ([1], [1], 0.0, "unlabeled_ratio must be a finite number > 0, got 0.0"),
        ([1], [1], float("nan"), "unlabeled_ratio must be a finite number > 0"),
    ],
)
def test_mixed_dataset_refuses(labelled, unlabelled_rows, ratio, message):
    with pytest.raises(ValueError, match=message):
        UnlabeledMixDataset(labelled, unlabelled_rows, ratio)


def test_collator_puts_labelled_rows_first_and_gives_unlabelled_rows_minus_100_in_the_labels_form():
    seen = []

    def collate(rows):
        seen.append(rows)
        return rows

    collator = UnlabeledMixCollator(collate)
    multi_hot = MixedExample([{"x": 1, "labels": [1.0, 0.0, 1.0]}, {"x": 2, "labels": [0.0, 1.0, 1.0]}, {"x": 3}])
    rows = collator([multi_hot, MixedExample([{"x": 4, "labels": [0.0, 0.0, 1.0]}, {"x": 5}])])
    assert [r["x"] for r in rows] == [1, 4, 2, 3, 5]
    assert rows[0]["labels"] == [1.0, 0.0, 1.0]  # labelled rows untouched
    assert all(r["labels"] == [-100.0] * 3 for r in rows[2:])  # the unlabelled row's own labels are dropped
    class_id = collator([MixedExample([{"x": 1, "label": 1}, {"x": 2, "label": 0}])])
    assert class_id[1] == {"x": 2, "label": -100}
    plain = [{"x": 1, "labels": 0}]
    assert collator(plain) == plain  # evaluation batches pass through unchanged
    with pytest.raises(ValueError, match="none of the label keys"):
        collator([MixedExample([{"x": 1}, {"x": 2}])])


# -- in the trainer ---------------------------------------------------------------------------------------------------
def test_every_batch_carries_its_share_under_gradient_accumulation(tmp_path):
    trainer = make_trainer(
        tmp_path,
        dataset=make_dataset(12),
        unlabeled_ratio=2.0,
        vat_weight=1.0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        unlabeled_dataset=unlabelled(10),
    )
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 6  # an epoch is one pass over the 12 labelled rows
    unlabelled_rows = 0
    for batch in batches:
        missing = batch["labels"] == -100
        assert batch["labels"].shape == (6,) and int((~missing).sum()) == 2 and bool(missing[2:].all())
        unlabelled_rows += int(missing.sum())
    assert unlabelled_rows == 24  # 2 per labelled row: the 10-row pool cycled through 2.4 times


def test_a_mixed_batch_trains_the_labelled_loss_and_the_vat_term_of_every_row(tmp_path, deterministic_vat_noise):
    """Gradient of one mixed micro-batch = mean cross-entropy over its labelled rows + vat_weight x LDS over all of
    its rows (Miyato et al.'s semi-supervised objective), as the reference implementation computes it."""
    model, reference_model = tiny_model(), tiny_model()
    trainer = make_trainer(tmp_path, model=model, vat_weight=0.5, unlabeled_ratio=1.5, unlabeled_dataset=unlabelled(5))
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = batch["labels"] != -100
    assert int(labelled.sum()) == 4 and batch["labels"].shape[0] == 10
    noise = deterministic_vat_noise(None, (*batch["input_ids"].shape, 32), torch.zeros(1))
    lds = reference.vat_term(reference_model, batch, noise, epsilon=1.0, xi=10.0, iterations=1)
    reference_model.zero_grad()
    inputs = {k: v[labelled] for k, v in batch.items()}
    (reference_model(**inputs).loss + 0.5 * lds).backward()

    loss = trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), grads(reference_model))
    torch.testing.assert_close(loss, reference_model(**inputs).loss.detach())


def test_before_vat_starts_unlabelled_rows_get_no_supervised_loss(tmp_path):
    """Until `adv_start_step`, a step is plain training, on the labelled rows alone: multi-hot -100 targets would
    otherwise enter the BCE as numbers."""
    kwargs = {"num_labels": 3, "problem_type": "multi_label_classification"}
    model, reference_model = tiny_model(**kwargs), tiny_model(**kwargs)
    trainer = make_trainer(
        tmp_path,
        model=model,
        dataset=make_dataset(8, multi_label=True, num_labels=3),
        vat_weight=1.0,
        adv_start_step=5,
        unlabeled_dataset=unlabelled(4),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = (batch["labels"] != -100).all(-1)
    assert int(labelled.sum()) == 4 and int((~labelled).sum()) == 4
    loss = trainer.training_step(trainer.model, dict(batch))
    logits = reference_model(input_ids=batch["input_ids"][labelled], attention_mask=batch["attention_mask"][labelled])
    expected = F.binary_cross_entropy_with_logits(logits.logits, batch["labels"][labelled])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    assert_close_dicts(grads(model), grads(reference_model))


def test_before_vat_starts_minus_100_rows_of_the_training_set_get_no_loss(tmp_path):
    """Without `unlabeled_dataset` too: rows of `train_dataset` labelled -100 are unlabelled, also in the plain
    steps before VAT starts."""
    kwargs = {"num_labels": 3, "problem_type": "multi_label_classification"}
    model, reference_model = tiny_model(**kwargs), tiny_model(**kwargs)
    batch = make_batch(multi_label=True, num_labels=3)
    batch["labels"][:2] = -100
    trainer = make_trainer(tmp_path, model=model, vat_weight=1.0, adv_start_step=5)
    loss = trainer.training_step(trainer.model, dict(batch))
    logits = reference_model(input_ids=batch["input_ids"][2:], attention_mask=batch["attention_mask"][2:]).logits
    expected = F.binary_cross_entropy_with_logits(logits, batch["labels"][2:])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    assert_close_dicts(grads(model), grads(reference_model))


def test_loss_code_that_indexes_by_label_sees_no_minus_100(tmp_path, deterministic_vat_noise):
    """A focal loss (`gather` on the labels) trains with unlabelled rows: the forwards that see them (VAT's) do not
    use their loss, and get labels it can index."""

    class Focal(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            p = outputs.logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)  # fails on -100
            loss = (-((1 - p) ** 2) * p.log()).mean()
            return (loss, outputs) if return_outputs else loss

    trainer = Focal(
        model=tiny_model(),
        args=training_args(tmp_path, vat_weight=1.0, max_steps=2),
        train_dataset=make_dataset(8),
        unlabeled_dataset=unlabelled(8),
    )
    assert trainer.train().metrics["train_unlabeled_rows"] == 8


def test_training_counts_labelled_epochs_and_logs_the_rows_seen(tmp_path):
    logs = []

    class Keep(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs_list.append(dict(logs or {}))

    logs_list = logs
    trainer = AdversarialTrainer(
        model=tiny_model(),
        args=training_args(tmp_path, vat_weight=1.0, unlabeled_ratio=3.0, num_train_epochs=2, logging_steps=1),
        train_dataset=make_dataset(8, seq_len=6),
        unlabeled_dataset=unlabelled(5, seq_len=6).add_column("text", ["t"] * 5),  # unused columns are dropped
        callbacks=[Keep()],
    )
    output = trainer.train()
    assert output.global_step == 4  # 2 epochs of 8 labelled rows in batches of 4
    assert output.metrics["train_labeled_rows"] == 16 and output.metrics["train_unlabeled_rows"] == 48
    steps = [entry for entry in logs if "loss" in entry]
    assert [entry["labeled_rows"] for entry in steps] == [4] * 4
    assert [entry["unlabeled_rows"] for entry in steps] == [12] * 4
    assert all(entry["vat_loss"] > 0 for entry in steps)
    counts = collections.Counter()
    mixed = trainer.unlabeled_mix
    for epoch in range(2):
        for i in range(len(mixed)):
            counts.update(mixed.unlabelled_indices(i, epoch))
    assert sum(counts.values()) == 48 and set(counts) == set(range(5))


@pytest.mark.parametrize(
    "overrides, dataset, message",
    [
        ({"vat_weight": 0.0}, unlabelled, r"do not learn from unlabelled rows: only vat does.*vat_weight=0"),
        ({"vat_weight": 0.0, "adv_method": "fgm"}, unlabelled, r"configured methods \(fgm"),
        ({"vat_weight": 1.0, "unlabeled_ratio": 2.0}, None, r"unlabeled_ratio=2.0 is read only with unlabelled"),
        ({"vat_weight": 1.0}, lambda: unlabelled().select([]), "unlabeled_dataset is empty"),
        ({"vat_weight": 1.0}, lambda: DatasetDict(train=unlabelled()), r"is a DatasetDict \(its keys: \['train'\]\)"),
        ({"vat_weight": 1.0}, lambda: unlabelled().to_dict(), r"is a dict .*Dataset\.from_dict\(dict\(columns\)\)"),
        ({"vat_weight": 1.0}, lambda: ["some text", "more"], r"examples must be dicts .* its first is a str"),
        (
            {"vat_weight": 1.0},
            lambda: Dataset.from_dict({"text": ["a b", "c"]}),
            r"has no \['input_ids', 'attention_mask'\] \(its columns: \['text'\]\).*tokenize it",
        ),
        (
            {"vat_weight": 1.0},
            lambda: unlabelled().remove_columns("attention_mask"),
            r"has no \['attention_mask'\] .*which train_dataset's examples give the model",
        ),
        ({"vat_weight": 1.0}, lambda: unlabelled().to_pandas(), r"is a pandas DataFrame: .*Dataset\.from_pandas"),
        (  # tokenized lazily: the parent's column removal leaves nothing (remove_unused_columns=False is the fix)
            {"vat_weight": 1.0},
            lambda: Dataset.from_dict({"n": [5, 6]}).with_transform(
                lambda b: {"input_ids": [[2, n, 3] for n in b["n"]], "attention_mask": [[1, 1, 1] for _ in b["n"]]}
            ),
            r"No columns in the dataset match the model's forward",
        ),
        (
            {"vat_weight": 1.0},
            lambda: BatchEncoding(unlabelled().to_dict()),
            r"is a BatchEncoding .*Dataset\.from_dict\(dict\(columns\)\)",
        ),
        (
            {"vat_weight": 1.0, "unlabeled_ratio": 0.01},
            unlabelled,
            r"unlabeled_ratio=0.01 with 16 labelled rows draws no",
        ),
        (
            {"vat_weight": 1.0, "dataloader_num_workers": 1, "dataloader_persistent_workers": True},
            unlabelled,
            "unlabeled_dataset with dataloader_persistent_workers=True: each worker would keep its copy",
        ),
    ],
)
def test_refused_at_construction(tmp_path, overrides, dataset, message):
    extra = {"unlabeled_dataset": dataset()} if dataset is not None else {}
    with pytest.raises(ValueError, match=message):
        AdversarialTrainer(
            model=tiny_model(), args=training_args(tmp_path, **overrides), train_dataset=make_dataset(), **extra
        )


def test_labels_outside_the_labels_column_are_refused_at_construction(tmp_path):
    """Unlabelled rows are marked by -100 in `labels` (or `label`, `label_ids`): a label column of another name
    (`label_names=["y"]` and a `compute_loss` that reads it, or a QA model's `start_positions`) is refused at once."""
    args = training_args(tmp_path, vat_weight=1.0, label_names=["y"])
    with pytest.raises(ValueError, match=r"no label column among .*label_names=\['y'\]\).*Rename the label column"):
        AdversarialTrainer(
            model=tiny_model(),
            args=args,
            train_dataset=make_dataset().rename_column("labels", "y"),
            unlabeled_dataset=unlabelled(),
        )


def test_group_by_length_is_refused(tmp_path):
    """transformers 4.x sorts training rows by length with `group_by_length`, which mixed batches cannot follow."""
    if "group_by_length" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip("this transformers has no group_by_length (removed in 5.0)")
    with pytest.raises(ValueError, match="group_by_length=True sorts the training rows"):
        AdversarialTrainer(
            model=tiny_model(),
            args=training_args(tmp_path, vat_weight=1.0, group_by_length=True),
            train_dataset=make_dataset(),
            unlabeled_dataset=unlabelled(),
        )


def test_unlabeled_ratio_is_checked_by_the_arguments(tmp_path):
    with pytest.raises(ValueError, match="unlabeled_ratio must be a finite number > 0, got -1"):
        training_args(tmp_path, unlabeled_ratio=-1.0)


def test_dataloader_workers_draw_each_epochs_own_unlabelled_rows(tmp_path):
    """With DataLoader workers (re-created every epoch), each epoch's batches carry that epoch's unlabelled rows."""
    pool = unlabelled(6, seed=5)
    trainer = make_trainer(
        tmp_path,
        dataset=make_dataset(4),
        vat_weight=1.0,
        unlabeled_ratio=1.0,
        dataloader_num_workers=1,
        unlabeled_dataset=pool,
    )
    loader = trainer.get_train_dataloader()
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        trainer.unlabeled_mix.begin_epoch(epoch)  # as the trainer's callback does
        (batch,) = list(loader)
        seen.append(sorted(map(tuple, batch["input_ids"][batch["labels"] == -100].tolist())))
    expected = [
        sorted(tuple(pool[j]["input_ids"]) for i in range(4) for j in trainer.unlabeled_mix.unlabelled_indices(i, e))
        for e in range(2)
    ]
    assert seen == expected and seen[0] != seen[1]


def test_resuming_mid_epoch_draws_that_epochs_unlabelled_rows(tmp_path):
    """A run resumed from a checkpoint in its second epoch trains on the batches the uninterrupted run had."""
    labelled = Dataset.from_dict({"input_ids": [[2, 10 + i, 11, 3] for i in range(8)], "labels": [0, 1] * 4})
    pool = Dataset.from_dict({"input_ids": [[2, 40 + j, 3, 0] for j in range(40)]})

    def run(output_dir, resume=None, max_steps=-1):
        batches = []

        class Spy(AdversarialTrainer):
            def training_step(self, model, inputs, *a, **k):
                batches.append((self.state.global_step, inputs["input_ids"][:, 1].tolist()))
                return super().training_step(model, inputs, *a, **k)

        # A shuffling sampler. On 5.x it has its own `set_epoch`, so Accelerate passes no epoch to the dataset; on 4.x
        # it has none, and the loader that skips the resumed epoch's first batches would pass epoch 0.
        shuffle = {"train_sampling_strategy": "random"} if "train_sampling_strategy" in FIELDS else {}
        args = training_args(
            tmp_path / output_dir,
            **shuffle,
            vat_weight=1.0,
            num_train_epochs=3,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            per_device_train_batch_size=4,
        )
        trainer = Spy(model=tiny_model(), args=args, train_dataset=labelled, unlabeled_dataset=pool)
        trainer.train(resume_from_checkpoint=resume)
        return dict(batches)

    full = run("full")
    assert len(full) == 6 and full[2] != full[0]  # 2 steps per epoch; epoch 1 draws other unlabelled rows
    run("cut", max_steps=3)  # stops in epoch 1, after a checkpoint at step 3 (epoch 1.5)
    resumed = run("cut", resume=str(tmp_path / "cut" / "out" / "checkpoint-3"))
    assert resumed == {step: rows for step, rows in full.items() if step >= 3}


def test_train_dataset_stays_the_labelled_rows(tmp_path):
    """`trainer.train_dataset` is the user's labelled dataset, mixed only in the training DataLoader: evaluating or
    predicting on it scores the labelled rows alone, and a training set assigned after construction is the one
    mixed."""
    labelled, other = make_dataset(8), make_dataset(12, seed=7)
    trainer = make_trainer(
        tmp_path, dataset=labelled, vat_weight=1.0, unlabeled_ratio=2.0, unlabeled_dataset=unlabelled(5)
    )
    assert trainer.train_dataset is labelled and trainer.unlabeled_mix is None
    assert len(trainer.predict(trainer.train_dataset).predictions) == 8
    assert trainer.evaluate(trainer.train_dataset)["eval_loss"] == trainer.evaluate(labelled)["eval_loss"]
    trainer.train_dataset = other
    metrics = trainer.train().metrics
    assert metrics["train_labeled_rows"] == 3 * 12 and metrics["train_unlabeled_rows"] == 3 * 24  # 3 epochs
    assert trainer.train_dataset is other and trainer.unlabeled_mix.labelled["labels"] == other["labels"]
    assert trainer.unlabeled_mix["labels"] == other["labels"]  # column access reads the labelled rows


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")  # the collator's, on numpy
@pytest.mark.parametrize("labelled_format, unlabelled_format", [(None, "torch"), ("torch", None), ("numpy", "torch")])
def test_datasets_in_other_formats_mix(tmp_path, labelled_format, unlabelled_format):
    """An unlabelled dataset in torch format beside plain labelled rows (and the other way round) trains."""
    trainer = make_trainer(
        tmp_path,
        dataset=make_dataset(8).with_format(labelled_format),
        vat_weight=1.0,
        unlabeled_dataset=unlabelled(5).with_format(unlabelled_format),
    )
    assert trainer.train().metrics["train_unlabeled_rows"] == 3 * 8
