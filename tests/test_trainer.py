"""AdversarialTrainer inside transformers.Trainer: equivalence with a plain run, gradient accumulation, restoring
weights, evaluation and checkpoints, mixed precision, logging and argument validation."""

from __future__ import annotations

import logging
import re

import pytest
import reference
import torch
from conftest import (
    Recorder,
    assert_close_dicts,
    assert_equal_dicts,
    grads,
    make_batch,
    make_dataset,
    make_trainer,
    state,
    tiny_config,
    tiny_model,
    training_args,
)
from safetensors.torch import load_file

from hf_adv import AWP, FGM, PGD, AdversarialTrainer, AdversarialTrainingArguments, list_methods

# Every registered method with its first case in tests/reference.py, and a perturbation with a regularizer.
METHODS = {name: reference.first_case(name).flags for name in list_methods(None)}
METHODS["fgm+vat"] = dict(adv_method="fgm", adv_epsilon=0.5, vat_weight=1.0)
# Defensive distillation, alone and with FGM: every pass's loss becomes the distillation loss (`teacher` is passed
# as `teacher_model=`).
METHODS["distill"] = dict(distill_temperature=5.0, distill_hard_weight=0.5, teacher=tiny_model(seed=5))
METHODS["fgm+distill"] = dict(adv_method="fgm", adv_epsilon=0.5, **METHODS["distill"])
# Methods whose perturbation carries over from one micro-batch to the next: a micro-batch's update depends on the
# ones before it, so accumulation is not the mean of independent single-batch runs (the step-level test holds).
CARRIES_STATE = {name for name in METHODS if name in reference.CASES and reference.CASES[name].steps > 1}


def test_none_is_bit_identical_to_plain_trainer(tmp_path):
    plain = make_trainer(tmp_path / "a", plain=True, max_steps=4, logging_steps=1, optim="adamw_torch")
    ours = make_trainer(tmp_path / "b", max_steps=4, logging_steps=1, optim="adamw_torch")
    plain.train()
    ours.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(plain) == losses(ours) and len(losses(ours)) == 4
    assert_equal_dicts(state(ours.model), state(plain.model))


def test_none_accumulation_equals_larger_batch(tmp_path):
    big = make_trainer(tmp_path / "a", per_device_train_batch_size=8, max_steps=2)
    accumulated = make_trainer(
        tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2
    )
    big.train()
    accumulated.train()
    assert_close_dicts(state(accumulated.model), state(big.model), atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(METHODS) - CARRIES_STATE))
def test_accumulation_is_mean_of_micro_batches(tmp_path, deterministic_vat_noise, name):
    """Batch 4 with GA 2 gives the mean of the updates its two micro-batches give as separate batches (SGD)."""
    overrides = METHODS[name]
    dataset = make_dataset(8)
    initial = state(tiny_model())
    accumulated = make_trainer(
        tmp_path / "ga", dataset=dataset, gradient_accumulation_steps=2, max_steps=1, **overrides
    )
    accumulated.train()
    updates = []
    for i in range(2):
        single = make_trainer(
            tmp_path / f"mb{i}", dataset=dataset.select(range(4 * i, 4 * i + 4)), max_steps=1, **overrides
        )
        single.train()
        updates.append({n: v - initial[n] for n, v in state(single.model).items()})
    expected = {n: initial[n] + (updates[0][n] + updates[1][n]) / 2 for n in initial}
    assert_close_dicts(state(accumulated.model), expected, atol=1e-6)
    # The adversarial pass changed the update (else this test would not test the method).
    plain = make_trainer(tmp_path / "plain", dataset=dataset, gradient_accumulation_steps=2, max_steps=1)
    plain.train()
    assert any(not torch.allclose(state(plain.model)[n], v, atol=1e-7) for n, v in expected.items())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_accumulation_step_level(tmp_path, deterministic_vat_noise, name):
    """Micro-batch 2 attacks with its own gradient, not with the gradient accumulated from micro-batch 1."""
    b1, b2 = make_batch(seed=1), make_batch(seed=2)
    trainer = make_trainer(tmp_path, **METHODS[name])
    model = trainer.model
    separate = []
    for b in (b1, b2):
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(model, dict(b))
        separate.append(grads(model))
    trainer = make_trainer(tmp_path, **METHODS[name])  # fresh: a carried perturbation starts from zero again
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 2
    trainer.training_step(model, dict(b1))
    trainer.training_step(model, dict(b2))
    assert_close_dicts(grads(model), {n: (separate[0][n] + separate[1][n]) / 2 for n in separate[0]}, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_weights_restored_when_adversarial_forward_raises(tmp_path, name):
    trainer = make_trainer(tmp_path, **METHODS[name])
    model = trainer.model
    before = state(model)
    original_forward = model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the clean pass succeeds; the first pass with a perturbation fails
            raise RuntimeError("boom")
        return original_forward(*args, **kwargs)

    model.forward = failing_forward
    with pytest.raises(RuntimeError, match="boom"):
        for _ in range(2):  # a method with one pass per step (carry) perturbs from the second step on
            trainer.training_step(model, make_batch())
    model.forward = original_forward
    assert_equal_dicts(state(model), before)
    tap = trainer.tap
    if tap is not None:  # installed once for the trainer's life, inactive and empty outside the step
        assert not tap.active and tap.delta is None and not tap.outputs and not tap.shapes


@pytest.mark.parametrize("name", sorted(METHODS))
def test_checkpoints_and_evaluation_never_see_perturbed_weights(tmp_path, name):
    """With learning rate 0 every checkpoint and every evaluation must see exactly the initial weights."""
    initial = state(tiny_model())
    eval_dataset = make_dataset(8, seed=5)
    trainer = make_trainer(
        tmp_path,
        dataset=make_dataset(),
        eval_dataset=eval_dataset,
        learning_rate=0.0,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        **METHODS[name],
    )
    trainer.train()
    for step in (1, 2):
        saved = load_file(str(tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors"))
        for n, v in initial.items():
            assert torch.equal(saved[n], v), (step, n)
    reference = make_trainer(tmp_path / "ref", plain=True, per_device_eval_batch_size=4)
    expected_loss = reference.evaluate(eval_dataset)["eval_loss"]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_losses == [expected_loss, expected_loss]
    assert_equal_dicts(state(trainer.model), initial)


@pytest.mark.parametrize("name", ["fgm", "pgd", "awp", "vat"])
def test_bf16_autocast_trains_and_restores_exactly(tmp_path, name):
    trainer = make_trainer(tmp_path, bf16=True, learning_rate=0.0, max_steps=2, logging_steps=1, **METHODS[name])
    assert trainer.accelerator.mixed_precision == "bf16"
    initial = state(trainer.model)
    trainer.train()
    assert_equal_dicts(state(trainer.model), initial)
    logs = [h for h in trainer.state.log_history if "clean_loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    moving = make_trainer(tmp_path / "b", bf16=True, learning_rate=1e-2, max_steps=2, **METHODS[name])
    moving.train()
    assert any(not torch.equal(v, initial[n]) for n, v in state(moving.model).items())


# -- fp16: directions do not depend on the GradScaler's loss scale; overflow steps are skipped ------------------------


def _perturbation(method, model, batch, loss_scale):
    """The weights inside `perturbed()` after a clean backward of `loss * loss_scale`."""
    with method.capture():
        (model(**batch).loss * loss_scale).backward()
        with method.perturbed(closure=lambda: model(**batch).loss * loss_scale) as attack:
            inside = state(model)
    model.zero_grad()
    return attack, inside


@pytest.mark.parametrize(
    "build",
    [lambda m: FGM(m, 0.5), lambda m: PGD(m, 0.5, 0.3, 3), lambda m: AWP(m, 1.0, 1e-2)],
    ids=["fgm", "pgd", "awp"],
)
def test_scaled_gradients_give_the_same_perturbation(build):
    batch = make_batch()
    model = tiny_model()
    method = build(model)
    _, unscaled = _perturbation(method, model, batch, 1.0)
    _, scaled = _perturbation(method, model, batch, 2.0**16)
    assert_equal_dicts(scaled, unscaled)  # power-of-two scales are exact in floating point
    before = state(model)
    attack, inside = _perturbation(method, model, batch, float("inf"))
    assert attack.skipped
    assert_equal_dicts(inside, before)
    method.remove()


def test_overflow_steps_are_skipped_and_counted(tmp_path):
    # Micro-batch 1 overflows; micro-batch 2 attacks with its own finite gradient, not the accumulated Inf one.
    trainer = make_trainer(tmp_path, adv_method="fgm", max_steps=1, gradient_accumulation_steps=2, logging_steps=1)
    original = trainer.compute_loss
    calls = {"n": 0}

    def overflowing(model, inputs, return_outputs=False, num_items_in_batch=None):
        calls["n"] += 1
        result = original(model, inputs, return_outputs, num_items_in_batch)
        if calls["n"] == 1:  # the first clean loss overflows, as in an fp16 step
            return result * float("inf")
        return result

    trainer.compute_loss = overflowing
    trainer.train()
    log = next(h for h in trainer.state.log_history if "adv_skipped" in h)
    assert log["adv_skipped"] == 1.0
    assert log["adv_loss"] > 0 and log["adv_perturbation_norm"] == pytest.approx(1.0)


# -- logging, start, validation ---------------------------------------------------------------------------------------


def test_metrics_reach_callbacks(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, adv_method="pgd", vat_weight=1.0, max_steps=4, logging_steps=2)
    trainer.add_callback(recorder)
    trainer.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        for key in ("clean_loss", "adv_loss", "vat_loss", "adv_perturbation_norm", "adv_skipped", "vat_skipped"):
            assert key in log, key
        assert log["adv_loss"] > 0 and 0 < log["adv_perturbation_norm"] <= 1.0 + 1e-5
        assert log["clean_loss"] == pytest.approx(log["loss"], rel=1e-4)
    assert trainer.state.log_history[0]["adv_loss"] == train_logs[0]["adv_loss"]


def test_attack_starts_after_warm_up(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, adv_method="fgm", adv_start_step=2, max_steps=4, logging_steps=1)
    trainer.add_callback(recorder)
    trainer.train()
    logs = [log for log in recorder.logs if "loss" in log]
    assert ["adv_loss" in log for log in logs] == [False, False, True, True]


def test_awp_waits_for_the_first_epoch_by_default(tmp_path):
    args = AdversarialTrainingArguments(output_dir=str(tmp_path), adv_method="awp", report_to="none")
    assert args.resolved_start_epoch == 1.0
    trainer = make_trainer(
        tmp_path,
        adv_method="awp",
        adv_start_epoch=None,
        num_train_epochs=2,
        logging_steps=1,
        per_device_train_batch_size=8,
    )
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    logs = [log for log in recorder.logs if "loss" in log]
    assert ["adv_loss" in log for log in logs] == [False, False, True, True]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(adv_method="fgn"), re.escape(f"adv_method='fgn' is not one of {list_methods()}")),
        (dict(adv_epsilon=0.0), "adv_epsilon must be a finite number > 0, got 0.0"),
        (dict(adv_epsilon=-1.0), "adv_epsilon must be a finite number > 0"),
        (dict(adv_steps=0), "adv_steps must be >= 1, got 0"),
        (dict(vat_iterations=0), "vat_iterations must be >= 1"),
        (dict(vat_weight=-0.1), "vat_weight must be >= 0"),
        (dict(awp_eps=0.0), "awp_eps must be a finite number > 0"),
        (dict(robust_eval_epsilons=[0.1, 0.0]), r"robust_eval_epsilons must all be > 0, got \[0.1, 0.0\]"),
        (dict(robust_eval_steps=0), "robust_eval_steps must be >= 1"),
        (dict(adv_method="fgm", adv_scope="sentence"), r"adv_scope='sentence' is not one of \['token', 'example'\]"),
        (
            dict(adv_method="pgd", adv_scope="example", adv_fraction=0.5),
            r"adv_fraction=0.5 is read only by the methods \['fgm', 'fgsm'\]",
        ),
        (dict(adv_fraction=0.0), r"adv_fraction must be in \(0, 1\], got 0.0"),
        (dict(adv_method="carry", adv_scope="example"), "token scope only"),
        (dict(adv_method="rdrop"), "set rdrop_weight > 0"),
        (dict(rdrop_weight=-1.0), "rdrop_weight must be >= 0"),
        (dict(adv_method="freelb", rdrop_weight=1.0), "runs no clean pass unless freelb_clean_loss=True"),
        (dict(adv_method="carry", rdrop_weight=1.0), "adv_method='carry' runs no clean pass. Set rdrop_weight=0."),
        (dict(adv_method="awp", adv_scope="example"), r"adv_scope='example' is read only by the methods \['fgm'"),
        (dict(adv_method="pgd", adv_init_mag=0.1), r"adv_init_mag=0.1 is read only by the methods \['freelb'\]"),
        (dict(vat_epsilon=2.0), "vat_epsilon=2.0 is read only by"),
        (dict(adv_epsilon=float("inf")), "adv_epsilon must be a finite number > 0, got inf"),
        (dict(rdrop_weight=float("inf")), "rdrop_weight must be finite"),
        (dict(adv_method="freelb", adv_init_mag=-0.1), "adv_init_mag must be >= 0"),
    ],
)
def test_invalid_arguments_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        AdversarialTrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


def test_arguments_parse_from_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(AdversarialTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--adv_method",
            "pgd",
            "--adv_epsilon",
            "0.7",
            "--adv_steps",
            "5",
            "--vat_weight",
            "0.5",
            "--adv_scope",
            "example",
            "--adv_start_epoch",
            "0.5",
            "--robust_eval_epsilons",
            "0.1",
            "0.5",
            "--report_to",
            "none",
        ]
    )
    assert (args.adv_method, args.adv_epsilon, args.adv_steps, args.vat_weight) == ("pgd", 0.7, 5, 0.5)
    assert args.robust_eval_epsilons == [0.1, 0.5]
    assert (args.adv_scope, args.adv_start_epoch) == ("example", 0.5)


def test_model_without_input_embeddings_fails_at_construction(tmp_path):
    class NoEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x, labels=None):
            return {"loss": self.linear(x).sum()}

    with pytest.raises(ValueError, match="NoEmbeddings has no input embeddings: it has no `get_input_embeddings"):
        make_trainer(tmp_path, model=NoEmbeddings(), adv_method="fgm")
    with pytest.raises(ValueError, match="pass `adv_embedding_name`"):
        make_trainer(tmp_path, model=NoEmbeddings(), vat_weight=1.0)
    # Standalone, the argument is `embedding_name`.
    with pytest.raises(ValueError, match="pass `embedding_name` with the name"):
        FGM(NoEmbeddings())


def test_training_step_outside_train(tmp_path):
    """`training_step` called directly (as tests and custom loops do) needs no state that only `train()` sets."""
    for overrides in ({}, {"adv_method": "fgm"}):
        trainer = make_trainer(tmp_path, **overrides)
        loss = trainer.training_step(trainer.model, make_batch())
        assert torch.isfinite(loss) and loss > 0


def test_awp_with_sparse_embedding_gradients():
    """nn.Embedding(sparse=True) gives a sparse gradient; AWP uses it densely and restores the weight exactly."""
    torch.manual_seed(0)

    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4, sparse=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids).mean(1))

    model = Sparse()
    ids, labels = torch.tensor([[1, 2, 3], [4, 5, 5]]), torch.tensor([0, 1])
    awp = AWP(model, lr=1.0, eps=1e-2)
    before = state(model)
    with awp.capture():
        torch.nn.functional.cross_entropy(model(ids), labels).backward()
        assert model.emb.weight.grad.is_sparse
        with awp.perturbed() as attack:
            assert not attack.skipped and attack.norm > 0
            assert not torch.equal(model.emb.weight, before["emb.weight"])
            torch.nn.functional.cross_entropy(model(ids), labels).backward()
    assert_equal_dicts(state(model), before)


def test_bad_embedding_name_lists_candidates(tmp_path):
    with pytest.raises(ValueError, match=r"adv_embedding_name='bert.wte.weight' is not a parameter.*word_embeddings"):
        make_trainer(tmp_path, adv_method="fgm", adv_embedding_name="bert.wte.weight")
    trainer = make_trainer(tmp_path, adv_method="fgm", adv_embedding_name="bert.embeddings.word_embeddings.weight")
    assert trainer.adversary.tap.weight is trainer.model.bert.embeddings.word_embeddings.weight


def test_vat_on_regression_model_uses_squared_error(tmp_path, deterministic_vat_noise):
    model = tiny_model(num_labels=1)
    batch = make_batch()
    batch["labels"] = batch["labels"].float()
    trainer = make_trainer(tmp_path, model=model, vat_weight=1.0, vat_xi=1e-3)
    trainer.training_step(trainer.model, dict(batch))
    assert trainer.vat.resolved_divergence == "mse"
    vat_loss = trainer._adv_metrics["vat_loss"][0]
    # LDS = mean squared distance between clean and perturbed predictions at the perturbation actually applied.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        clean = model(**inputs).logits
    assert vat_loss > 0 and torch.isfinite(vat_loss)
    with pytest.raises(ValueError, match="vat_divergence='kld' is not one of"):
        AdversarialTrainingArguments(output_dir=str(tmp_path), report_to="none", vat_divergence="kld")
    assert clean.shape == (4, 1)


def test_plain_training_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="AdversarialTrainingArguments"):
        AdversarialTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


# -- drop-in edge cases found by trying the library as a user -------------------------------------------------------


@pytest.mark.parametrize(
    "peft_kwargs",
    [dict(modules_to_save=["word_embeddings"]), dict(target_modules=["query", "value", "word_embeddings"])],
    ids=["modules_to_save", "lora-on-embedding"],
)
def test_peft_wrapped_embedding_is_perturbed_once(peft_kwargs):
    """A PEFT wrapper around the embedding calls the inner nn.Embedding: only the one doing the lookup is hooked,
    so the attack is the one of an unwrapped embedding (LoRA starts as the identity: same function)."""
    peft = pytest.importorskip("peft")
    batch = make_batch()

    def adversarial_loss(**kwargs):
        config = dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
        config.update(kwargs)
        model = peft.get_peft_model(tiny_model(), peft.LoraConfig(**config))
        fgm = FGM(model, epsilon=0.5)
        model(**batch).loss.backward()
        with fgm.perturbed() as attack:
            loss = model(**batch).loss.item()
        fgm.remove()
        return loss, len(fgm.tap.modules), float(attack.norm)

    assert adversarial_loss(**peft_kwargs) == pytest.approx(adversarial_loss(), abs=1e-6)
    assert adversarial_loss(**peft_kwargs)[1] == 1


def test_forward_without_backward_before_the_attack_is_refused():
    """A grad-enabled forward that never gets a backward (an accuracy check) would lend its lookups to the attack."""
    model = tiny_model()
    fgm = FGM(model, epsilon=0.5)
    model(**make_batch(seed=7))  # a probe: grad enabled, no backward
    model(**make_batch()).loss.backward()
    with pytest.raises(RuntimeError, match="1 of the 2 input-embedding lookups .* received no gradient"):
        with fgm.perturbed():
            pass
    fgm.remove()


def test_vat_forwards_go_through_the_users_compute_loss(tmp_path):
    """An override that drops a column before calling a strict model: VAT's passes see what the override makes."""
    from datasets import Dataset

    class Strict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = tiny_model()

        def get_input_embeddings(self):
            return self.bert.get_input_embeddings()

        def forward(self, input_ids, attention_mask, labels=None):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    class DropsIndex(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs.pop("idx")
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    rows = {k: v.tolist() for k, v in make_batch(8).items()}
    dataset = Dataset.from_dict({**rows, "idx": list(range(8))})
    args = training_args(
        tmp_path, vat_weight=1.0, adv_method="pgd", max_steps=2, logging_steps=1, remove_unused_columns=False
    )
    trainer = DropsIndex(model=Strict(), args=args, train_dataset=dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "vat_loss" in h]
    assert logs and all(h["vat_loss"] > 0 and h["adv_loss"] > 0 for h in logs)


def test_vat_on_question_answering_heads(tmp_path, deterministic_vat_noise):
    """start_logits and end_logits: the divergence is the sum of the two softmax KLs over positions."""
    from datasets import Dataset
    from transformers import BertForQuestionAnswering

    from hf_adv.losses import find_logits

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_config())
    batch = make_batch(8)
    rows = {"input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist()}
    dataset = Dataset.from_dict({**rows, "start_positions": [1] * 8, "end_positions": [3] * 8})
    trainer = AdversarialTrainer(
        model=model, args=training_args(tmp_path, vat_weight=1.0, max_steps=2, logging_steps=1), train_dataset=dataset
    )
    trainer.train()
    assert all(h["vat_loss"] > 0 for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h)
    start, end = find_logits(model(input_ids=batch["input_ids"][:2]))
    assert start.shape == end.shape == (2, 10)


def test_losses_are_logged_per_micro_batch_with_compute_loss_func(tmp_path):
    """A compute_loss_func loss is normalised over the accumulation window; clean_loss and adv_loss are logged on the
    scale of `loss` (a micro-batch's mean), whatever the accumulation."""

    def mean_ce(outputs, labels, num_items_in_batch=None):
        total = torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    logged = {}
    for accumulation in (1, 2):
        trainer = make_trainer(
            tmp_path / str(accumulation),
            dataset=make_dataset(8),
            adv_method="fgm",
            max_steps=1,
            logging_steps=1,
            learning_rate=0.0,
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
        )
        trainer.compute_loss_func = mean_ce
        trainer.train()
        logged[accumulation] = next(h for h in trainer.state.log_history if "clean_loss" in h)
    for log in logged.values():
        assert log["clean_loss"] == pytest.approx(log["loss"], rel=1e-3)
    assert logged[2]["adv_loss"] == pytest.approx(logged[1]["adv_loss"], rel=0.05)


def test_causal_lm_accumulation_is_token_weighted_as_in_trainer(tmp_path):
    """A causal LM's own loss divides by the label tokens of the whole accumulated batch: micro-batches with few
    label tokens weigh less, and batch 4 x GA 2 gives the update of batch 8, as with a plain Trainer."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    def lm():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(config)

    ids = torch.randint(1, 99, (8, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:4, :9] = -100  # the first micro-batch has few label tokens
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    big = make_trainer(tmp_path / "big", model=lm(), dataset=dataset, max_steps=1, per_device_train_batch_size=8)
    accumulated = make_trainer(
        tmp_path / "ga", model=lm(), dataset=dataset, max_steps=1, gradient_accumulation_steps=2
    )
    assert accumulated.model_accepts_loss_kwargs and not make_trainer(tmp_path / "bert").model_accepts_loss_kwargs
    big.train()
    accumulated.train()
    assert_close_dicts(state(accumulated.model), state(big.model), atol=1e-6)


def test_vat_is_not_an_adv_method(tmp_path):
    with pytest.raises(ValueError, match="set vat_weight > 0"):
        AdversarialTrainingArguments(output_dir=str(tmp_path), report_to="none", adv_method="vat")


@pytest.mark.parametrize(
    "xi, iterations, warned", [(10.0, 2, True), (1.0, 3, True), (0.5, 2, False), (10.0, 1, False)]
)
def test_vat_warns_when_a_large_probe_meets_several_power_iterations(tmp_path, caplog, xi, iterations, warned):
    """From vat_xi >= 1 a second power iteration loses the adversarial direction (benchmarks/vat_probe.py): the
    trainer says so once per process (a `model_init` trainer rebuilds its methods at every `train()`), naming both
    flags; the default (xi 10, one iteration) and a probe below 1 are quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # another test may have built the same VAT already
    with caplog.at_level(logging.WARNING, logger="hf_adv"):
        for _ in range(2):
            make_trainer(tmp_path, vat_weight=1.0, vat_xi=xi, vat_iterations=iterations)
    messages = [r.getMessage() for r in caplog.records if "vat_iterations" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert f"(vat_iterations) {iterations}" in messages[0] and f"(vat_xi) {xi}" in messages[0]


def test_a_registered_method_is_built_from_its_flags(tmp_path, monkeypatch):
    """The trainer, the arguments and the recipes' summary learn a method from the registry: its flags
    (`args_kwargs`), its default start (`default_start_epoch`) and its description."""
    from hf_adv.methods import base

    class HalfFGM(FGM):
        name = "half_fgm"
        default_start_epoch = 0.5

        @classmethod
        def args_kwargs(cls, args):
            return {"epsilon": args.adv_epsilon / 2}

    monkeypatch.setitem(base._METHODS, "half_fgm", HalfFGM)
    args = AdversarialTrainingArguments(output_dir=str(tmp_path), report_to="none", adv_method="half_fgm")
    assert args.resolved_start_epoch == 0.5
    trainer = make_trainer(tmp_path, adv_method="half_fgm", adv_epsilon=0.5)
    assert isinstance(trainer.adversary, HalfFGM) and trainer.adversary.epsilon == 0.25
    trainer.training_step(trainer.model, make_batch())
    assert float(trainer._adv_metrics["adv_perturbation_norm"][0]) == pytest.approx(0.25)
    assert HalfFGM.describe(args) == "half_fgm (epsilon 1.0)"
