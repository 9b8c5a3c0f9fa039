"""Defensive distillation: the student's gradients equal a straightforward reference, alone and with FGM, for
softmax and multi-label models; the refusals; a run through `train()` with the teacher loaded from a folder.
(Accumulation, restore and checkpoints: `distill` and `fgm+distill` in test_trainer.py's METHODS; DDP: ddp_worker.)"""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import assert_close_dicts, grads, make_batch, make_trainer, state, tiny_model

from hf_adv import AdversarialTrainingArguments


def soft_loss(student_logits, teacher_logits, temperature, multi_label):
    """Hinton et al.'s loss written out: T^2 x cross-entropy of the teacher's softened predictions."""
    t = temperature
    if multi_label:
        p = torch.sigmoid(teacher_logits / t)
        q = student_logits / t
        return t * t * -(p * F.logsigmoid(q) + (1 - p) * F.logsigmoid(-q)).mean()
    return t * t * -(F.softmax(teacher_logits / t, -1) * F.log_softmax(student_logits / t, -1)).sum(-1).mean()


def reference_step(model, teacher, batch, temperature, hard_weight, multi_label, epsilon=None):
    """Distillation loss, back-propagated; with `epsilon`, plus token-scope FGM's pass on the same loss."""
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def loss_at(delta=None):
        embedding = model.get_input_embeddings()
        handle = None
        if delta is not None:
            handle = embedding.register_forward_hook(lambda m, a, out: out + delta[a[0]])
        try:
            out = model(**batch)
        finally:
            if handle is not None:
                handle.remove()
        return soft_loss(out.logits, teacher_logits, temperature, multi_label) + hard_weight * out.loss

    model.zero_grad()
    loss_at().backward()
    if epsilon is not None:
        g = model.get_input_embeddings().weight.grad.detach().clone()
        model.zero_grad()
        clean = loss_at()
        clean.backward()
        r = epsilon * g / g.norm()
        loss_at(r).backward()


@pytest.mark.parametrize("multi_label", [False, True], ids=["softmax", "bernoulli"])
@pytest.mark.parametrize("adv_method", ["none", "fgm"])
@pytest.mark.parametrize("temperature,hard_weight", [(20.0, 0.0), (5.0, 0.5)])
def test_distillation_matches_reference(tmp_path, multi_label, adv_method, temperature, hard_weight):
    num_labels = 3 if multi_label else 2
    kwargs = {"num_labels": num_labels}
    if multi_label:
        kwargs["problem_type"] = "multi_label_classification"
    batch = make_batch(multi_label=multi_label, num_labels=num_labels)
    teacher = tiny_model(seed=5, **kwargs)
    expected_model = tiny_model(**kwargs)
    reference_step(
        expected_model,
        teacher,
        batch,
        temperature,
        hard_weight,
        multi_label,
        epsilon=0.5 if adv_method == "fgm" else None,
    )
    expected = grads(expected_model)

    model = tiny_model(**kwargs)
    args = {"adv_method": adv_method, "distill_temperature": temperature, "distill_hard_weight": hard_weight}
    if adv_method == "fgm":
        args["adv_epsilon"] = 0.5
    trainer = make_trainer(tmp_path, model=model, distill_teacher=None, **args, teacher=teacher)
    teacher_before = state(teacher)
    before = state(model)
    model.zero_grad()
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), expected)
    # The teacher is frozen and untouched; the student's weights are back after FGM.
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[n]) for n, v in state(teacher).items())
    assert all(torch.equal(v, before[n]) for n, v in state(model).items())
    # Distillation changed the gradient: it is not the plain cross-entropy's.
    plain = tiny_model(**kwargs)
    reference.clean(plain, batch)
    assert any(not torch.allclose(grads(model)[n], g, atol=1e-6) for n, g in grads(plain).items())


def test_distillation_trains_from_a_teacher_folder(tmp_path):
    """`distill_teacher` loads a saved checkpoint with the student's class; `train()` runs and logs."""
    teacher = tiny_model(seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = make_trainer(
        tmp_path, distill_teacher=str(tmp_path / "teacher"), distill_temperature=5.0, logging_steps=1, max_steps=2
    )
    assert trainer.distillation is not None and trainer.distillation.temperature == 5.0
    loaded = trainer.distillation.teacher
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), teacher.parameters()))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_distillation_refusals(tmp_path):
    with pytest.raises(ValueError, match="distill_temperature=5.0 is read only with a distillation teacher"):
        make_trainer(tmp_path, distill_temperature=5.0)
    with pytest.raises(ValueError, match="distill_hard_weight=0.5 is read only with a distillation teacher"):
        make_trainer(tmp_path, distill_hard_weight=0.5)
    with pytest.raises(ValueError, match="distill_temperature must be a finite number > 0"):
        AdversarialTrainingArguments(output_dir=str(tmp_path), distill_teacher="t", distill_temperature=0.0)
    with pytest.raises(ValueError, match="could not be loaded"):
        make_trainer(tmp_path, distill_teacher=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="predicts 3 labels and the student 2"):
        make_trainer(tmp_path, teacher=tiny_model(num_labels=3))
    model = tiny_model()
    with pytest.raises(ValueError, match="teacher is the model being trained"):
        make_trainer(tmp_path, model=model, teacher=model)
    with pytest.raises(ValueError, match="classification model"):
        make_trainer(tmp_path, model=tiny_model(num_labels=1), teacher=tiny_model(num_labels=1))


def test_distillation_reads_multi_label_from_float_labels(tmp_path):
    """A student whose config leaves problem_type unset, trained on multi-hot float labels, is distilled with
    per-label sigmoids, as transformers infers multi-label from such labels."""
    batch = make_batch(multi_label=True, num_labels=3)
    teacher = tiny_model(seed=5, num_labels=3)
    expected_model = tiny_model(num_labels=3, problem_type="multi_label_classification")
    reference_step(expected_model, teacher, batch, 2.0, 0.0, multi_label=True)
    model = tiny_model(num_labels=3)
    assert model.config.problem_type is None
    trainer = make_trainer(tmp_path, model=model, teacher=teacher, distill_temperature=2.0)
    assert trainer.distillation.problem_type is None  # left to the labels
    model.zero_grad()
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), grads(expected_model))


def test_teacher_logits_are_not_reused_for_another_batch(tmp_path):
    """The teacher's logits are kept for the passes of one batch only, even when a new batch's tensors land at the
    address of a freed one."""
    trainer = make_trainer(tmp_path, teacher=tiny_model(seed=5))
    distillation = trainer.distillation
    for seed in range(6):
        batch = {k: v.clone() for k, v in make_batch(seed=seed).items()}
        expected = distillation.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        torch.testing.assert_close(distillation.teacher_logits(batch), expected)
        assert distillation.teacher_logits(batch) is distillation.teacher_logits(dict(batch))  # one teacher pass
        del batch


def test_teacher_of_another_architecture_loads_from_its_folder(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=2,
        max_position_embeddings=40,
        pad_token_id=0,
    )
    torch.manual_seed(3)
    teacher = RobertaForSequenceClassification(config)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = make_trainer(tmp_path, distill_teacher=str(tmp_path / "teacher"))
    loaded = trainer.distillation.teacher
    assert isinstance(loaded, RobertaForSequenceClassification)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), teacher.parameters()))


# -- the first stage: a teacher trained at temperature T --------------------------------------------------------------
@pytest.mark.parametrize("multi_label", [False, True], ids=["softmax", "bernoulli"])
@pytest.mark.parametrize("adv_method", ["none", "fgm"])
def test_training_at_a_temperature_matches_reference(tmp_path, multi_label, adv_method):
    """Papernot et al.'s teacher: T x CE(softmax(z / T), y) (BCE of sigmoid(z / T) for multi-label), alone and as
    the loss of FGM's passes."""
    num_labels, temperature = (3 if multi_label else 2), 20.0
    kwargs = {"num_labels": num_labels, **({"problem_type": "multi_label_classification"} if multi_label else {})}
    batch = make_batch(multi_label=multi_label, num_labels=num_labels)
    model, reference_model = tiny_model(**kwargs), tiny_model(**kwargs)

    def loss_at(delta=None):
        handle = None
        if delta is not None:
            embedding = reference_model.get_input_embeddings()
            handle = embedding.register_forward_hook(lambda m, a, out: out + delta[a[0]])
        try:
            logits = reference_model(**batch).logits / temperature
        finally:
            if handle is not None:
                handle.remove()
        if multi_label:
            return temperature * F.binary_cross_entropy_with_logits(logits, batch["labels"])
        return temperature * F.cross_entropy(logits, batch["labels"])

    loss_at().backward()
    if adv_method == "fgm":
        g = reference_model.get_input_embeddings().weight.grad.detach().clone()
        reference_model.zero_grad()
        loss_at().backward()
        loss_at(0.5 * g / g.norm()).backward()

    trainer = make_trainer(
        tmp_path, model=model, adv_method=adv_method, adv_epsilon=0.5, distill_train_temperature=temperature
    )
    before = state(model)
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), grads(reference_model))
    assert all(torch.equal(value, before[name]) for name, value in state(model).items())


def test_training_at_a_temperature_refusals_and_summary(tmp_path):
    with pytest.raises(ValueError, match="one stage at a time"):
        AdversarialTrainingArguments(output_dir=str(tmp_path), distill_teacher="t", distill_train_temperature=20.0)
    with pytest.raises(ValueError, match="distill_train_temperature must be a finite number > 0, got 0.0"):
        AdversarialTrainingArguments(output_dir=str(tmp_path), distill_train_temperature=0.0)
    with pytest.raises(ValueError, match="needs a classification model"):
        make_trainer(tmp_path, model=tiny_model(num_labels=1), distill_train_temperature=20.0)
    args = AdversarialTrainingArguments(output_dir=str(tmp_path), distill_train_temperature=20.0)
    from hf_adv.distillation import Distillation

    assert Distillation.describe(args) == "trained at temperature 20 (defensive distillation's teacher)"
    trainer = make_trainer(tmp_path, distill_train_temperature=20.0, max_steps=2, logging_steps=1)
    trainer.train()
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 2
