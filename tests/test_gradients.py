"""Gradients of every method equal those of a straightforward reference implementation (tests/reference.py)."""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import assert_close_dicts, grads, make_batch, make_trainer, state, tiny_model

from hf_adv import AWP, FGM, FGSM, PGD, list_methods
from hf_adv.methods import get_method_class


@pytest.mark.parametrize("case", list(reference.CASES))
def test_trainer_step_matches_reference(tmp_path, deterministic_vat_noise, case):
    """Every case of every registered method (tests/reference.py): the trainer's gradients after `case.steps` steps
    equal the reference implementation's, the method changed them, and every weight is back bit for bit."""
    spec = reference.CASES[case]
    batch = make_batch()
    model = tiny_model(**spec.model)
    reference_model = tiny_model(**spec.model)
    torch.manual_seed(7)
    spec.step(reference_model, batch)
    expected = grads(reference_model)

    trainer = make_trainer(tmp_path, model=model, **spec.flags)
    before = state(model)
    torch.manual_seed(7)
    for _ in range(spec.steps):
        model.zero_grad()
        trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), expected)
    # The method really contributed: the gradient differs from the clean one.
    clean_model = tiny_model(**spec.model)
    torch.manual_seed(7)
    reference.clean(clean_model, batch)
    assert any(not torch.allclose(grads(model)[n], g, atol=1e-6) for n, g in grads(clean_model).items())
    # And every weight is back, bit for bit.
    for name, value in state(model).items():
        assert torch.equal(value, before[name]), name


def test_every_registered_method_has_a_reference():
    """Registering a method without its reference implementation in tests/reference.py fails here."""
    covered = {case.method for case in reference.CASES.values()}
    assert set(list_methods(None)) <= covered, set(list_methods(None)) - covered


def test_awp_with_rdrop_matches_reference(tmp_path):
    """AWP moves the weights in place while R-Drop keeps the clean pass's graph for its backward: the graph must keep
    the weights it was computed with (the step used to fail with "modified by an inplace operation")."""
    batch = make_batch()
    model, reference_model = tiny_model(hidden_dropout_prob=0.2), tiny_model(hidden_dropout_prob=0.2)
    torch.manual_seed(7)
    reference.awp_rdrop(reference_model, batch, 1.0, 1e-2, 0.5)
    trainer = make_trainer(tmp_path, model=model, adv_method="awp", awp_lr=1.0, awp_eps=1e-2, rdrop_weight=0.5)
    before = state(model)
    torch.manual_seed(7)
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), grads(reference_model))
    for name, value in state(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_rdrop_multi_label_and_regression_match_reference(tmp_path, problem_type):
    """R-Drop's divergence for the other heads: the Bernoulli KL averaged over labels, the squared error."""
    num_labels = 3 if problem_type == "multi_label_classification" else 1
    batch = make_batch(multi_label=num_labels == 3, num_labels=num_labels)
    if problem_type == "regression":
        batch["labels"] = torch.linspace(-1.0, 1.0, len(batch["labels"]))
    kwargs = dict(hidden_dropout_prob=0.2, num_labels=num_labels, problem_type=problem_type)
    model, reference_model = tiny_model(**kwargs), tiny_model(**kwargs)
    torch.manual_seed(7)
    reference.rdrop(reference_model, batch, 0.5, kind="bernoulli" if num_labels == 3 else "mse")
    trainer = make_trainer(tmp_path, model=model, rdrop_weight=0.5)
    torch.manual_seed(7)
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), grads(reference_model))


@pytest.mark.parametrize("regularizer", list_methods("regularizer"))
@pytest.mark.parametrize("perturbation", [m for m in list_methods("perturbation") if m != "none"])
def test_every_perturbation_combines_with_every_regularizer(tmp_path, perturbation, regularizer):
    """Each registered perturbation with each registered regularizer (single-label, multi-label, regression): a
    step runs, its gradients are finite and differ from the perturbation's alone, and every weight is back; or, for a
    pair that cannot work, construction refuses it."""
    for problem_type, num_labels in (
        ("single_label_classification", 2),
        ("multi_label_classification", 3),
        ("regression", 1),
    ):
        batch = make_batch(multi_label=problem_type == "multi_label_classification", num_labels=num_labels)
        if problem_type == "regression":
            batch["labels"] = torch.linspace(-1.0, 1.0, len(batch["labels"]))
        kwargs = dict(hidden_dropout_prob=0.2, num_labels=num_labels, problem_type=problem_type)
        alone_flags = reference.first_case(perturbation).flags
        flags = {**alone_flags, f"{regularizer}_weight": 0.5}
        args = make_trainer(tmp_path, model=tiny_model(**kwargs), **alone_flags).args
        if get_method_class(regularizer).needs_clean_graph and not get_method_class(perturbation).runs_clean_pass(
            args
        ):
            # A method that runs no clean pass (carry, FreeLB without its clean loss) has none to compare R-Drop's
            # second pass with: refused at construction, naming the flag.
            with pytest.raises(ValueError, match=f"{regularizer}_weight=0.5 compares the clean pass"):
                make_trainer(tmp_path, model=tiny_model(**kwargs), **flags)
            continue
        results = []
        for step_flags in (flags, alone_flags):
            model = tiny_model(**kwargs)
            trainer = make_trainer(tmp_path, model=model, **step_flags)
            before = state(model)
            torch.manual_seed(7)
            trainer.training_step(trainer.model, dict(batch))
            results.append(grads(model))
            for name, value in state(model).items():
                assert torch.equal(value, before[name]), (problem_type, name)
        combined, alone = results
        assert all(torch.isfinite(g).all() for g in combined.values()), problem_type
        assert any(not torch.allclose(combined[n], g) for n, g in alone.items()), problem_type


@pytest.mark.parametrize("multi_label", [False, True], ids=["softmax", "bernoulli"])
@pytest.mark.parametrize("adv_method", ["none", "fgm"])
def test_vat_matches_reference(tmp_path, deterministic_vat_noise, multi_label, adv_method):
    num_labels = 3 if multi_label else 2
    batch = make_batch(multi_label=multi_label, num_labels=num_labels)
    kwargs = {"num_labels": num_labels}
    if multi_label:
        kwargs["problem_type"] = "multi_label_classification"
    model, reference_model = tiny_model(**kwargs), tiny_model(**kwargs)
    noise = deterministic_vat_noise(None, (*batch["input_ids"].shape, 32), torch.zeros(1))

    reference_model.zero_grad()
    lds = reference.vat_term(
        reference_model, batch, noise, epsilon=1.0, xi=10.0, iterations=2, multi_label=multi_label
    )
    total = reference_model(**batch).loss + 0.7 * lds
    total.backward()
    if adv_method == "fgm":
        # FGM's pass adds the gradient of the adversarial loss; VAT's adds 0.7 * grad LDS (computed after restore).
        fgm_model = tiny_model(**kwargs)
        reference.fgm(fgm_model, batch, 0.5)
        fgm_clean = tiny_model(**kwargs)
        reference.clean(fgm_clean, batch)
        adv_only = {n: g - grads(fgm_clean)[n] for n, g in grads(fgm_model).items()}
        expected = {n: g + adv_only[n] for n, g in grads(reference_model).items()}
    else:
        expected = grads(reference_model)

    trainer = make_trainer(
        tmp_path,
        model=model,
        adv_method=adv_method,
        adv_epsilon=0.5,
        vat_weight=0.7,
        vat_epsilon=1.0,
        vat_xi=10.0,
        vat_iterations=2,
    )
    trainer.training_step(trainer.model, dict(batch))
    assert_close_dicts(grads(model), expected)


def test_semi_supervised_unlabelled_examples_contribute_only_vat(tmp_path, deterministic_vat_noise):
    batch = make_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    model, reference_model = tiny_model(), tiny_model()
    noise = deterministic_vat_noise(None, (*batch["input_ids"].shape, 32), torch.zeros(1))
    lds = reference.vat_term(reference_model, batch, noise, epsilon=1.0, xi=10.0, iterations=1)
    reference_model.zero_grad()
    (0.5 * lds).backward()

    trainer = make_trainer(tmp_path, model=model, vat_weight=0.5)
    loss = trainer.training_step(trainer.model, dict(batch))
    assert float(loss) == 0.0
    got = grads(model)
    assert_close_dicts(
        {n: got.get(n, torch.zeros_like(g)) for n, g in grads(reference_model).items()}, grads(reference_model)
    )


def test_partially_labelled_multi_label_batch(tmp_path, deterministic_vat_noise):
    batch = make_batch(multi_label=True, num_labels=3)
    batch["labels"][:2] = -100  # two unlabelled examples
    model = tiny_model(num_labels=3, problem_type="multi_label_classification")
    trainer = make_trainer(tmp_path, model=model, vat_weight=1.0)
    loss = trainer.training_step(trainer.model, dict(batch))
    logits = tiny_model(num_labels=3, problem_type="multi_label_classification")(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[2:], batch["labels"][2:])
    torch.testing.assert_close(loss, expected.detach())


# -- the same methods in a hand-written loop ------------------------------------------------------------------------

STANDALONE = {
    "fgm": (lambda m: FGM(m, epsilon=0.5), lambda m, b: reference.fgm(m, b, 0.5)),
    "fgsm": (lambda m: FGSM(m, epsilon=0.02), lambda m, b: reference.fgm(m, b, 0.02, sign=True)),
    "pgd": (lambda m: PGD(m, epsilon=0.5, alpha=0.3, steps=3), lambda m, b: reference.pgd(m, b, 0.5, 0.3, 3)),
    "awp": (lambda m: AWP(m, lr=1.0, eps=1e-2), lambda m, b: reference.awp(m, b, 1.0, 1e-2)),
    # Example scope without the batch: padding found from the embedding's padding_idx (the test batch pads with 0).
    "fgm-example": (lambda m: FGM(m, epsilon=0.5, scope="example"), lambda m, b: reference.fgm_example(m, b, 0.5)),
    "pgd-example": (
        lambda m: PGD(m, epsilon=0.5, alpha=0.3, steps=3, scope="example"),
        lambda m, b: reference.pgd_example(m, b, 0.5, 0.3, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(STANDALONE))
@pytest.mark.parametrize("use_capture", [True, False])
def test_hand_written_loop_matches_reference(name, use_capture):
    build, reference_step = STANDALONE[name]
    batch = make_batch()
    reference_model = tiny_model()
    reference_step(reference_model, batch)

    model = tiny_model()
    method = build(model)
    capture = method.capture() if use_capture else torch.enable_grad()
    with capture:
        model(**batch).loss.backward()
        with method.perturbed(closure=lambda: model(**batch).loss) as attack:
            assert not attack.skipped and attack.norm > 0
            model(**batch).loss.backward()
    method.remove()
    assert_close_dicts(grads(model), grads(reference_model))
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("lookups", [1, 2, 3], ids=["one-lookup", "two-lookups", "three-lookups"])
@pytest.mark.parametrize(
    "kwargs", [{"padding_idx": 0}, {"scale_grad_by_freq": True}, {"padding_idx": 3, "scale_grad_by_freq": True}]
)
def test_tap_row_gradient_equals_embedding_backward(lookups, kwargs):
    """Scattering the output gradients onto touched rows reproduces nn.Embedding's own weight gradient, also when the
    weight is looked up several times before one backward (a siamese model), each lookup with its own weight in the
    loss, and with `scale_grad_by_freq` (counted per call, as nn.Embedding does)."""
    from hf_adv.embedding import EmbeddingTap

    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 5, **kwargs)
    ids = [torch.tensor([[0, 3, 3, 7], [7, 0, 1, 3]]), torch.tensor([[5, 5, 5], [3, 9, 0]]), torch.tensor([[7, 7]])]
    tap = EmbeddingTap(emb, emb.weight)
    tap.attach()
    loss = sum((k + 1) * (emb(i) * torch.randn(*i.shape, 5)).sum() for k, i in enumerate(ids[:lookups]))
    loss.backward()
    rows, row_grad = tap.captured_gradient()
    tap.detach()
    assert rows.tolist() == torch.cat([i.reshape(-1) for i in ids[:lookups]]).unique().tolist()
    torch.testing.assert_close(row_grad, emb.weight.grad[rows])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[rows] = False
    assert emb.weight.grad[untouched].abs().sum() == 0


def test_fgm_direction_with_two_lookups_is_the_weight_gradient():
    """A bi-encoder looks up the same weight twice before one backward: FGM's direction is the true weight.grad."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8)

    class BiEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, torch.nn.Linear(8, 1)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, a, b):
            return (self.head(torch.tanh(self.emb(a)).mean(1)) * self.head(self.emb(b).mean(1))).sum()

    model = BiEncoder()
    a, b = torch.tensor([[1, 2, 3, 2]]), torch.tensor([[9, 1, 1, 4, 5]])
    fgm = FGM(model, epsilon=1.0)
    model(a, b).backward()
    rows, grad = fgm.tap.captured_gradient()
    expected = emb.weight.grad[rows]
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), expected.flatten(), dim=0)
    assert cosine > 1 - 1e-6
    # The perturbation FGM adds to each lookup is r[row] for the row that position looks up.
    with fgm.perturbed() as attack:
        r = 1.0 * expected / expected.norm()
        outputs = []
        handle = emb.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
        model(a, b)
        handle.remove()
    for ids, out in zip((a, b), outputs):
        position_rows = torch.searchsorted(rows, ids)
        torch.testing.assert_close(out - emb.weight[ids].detach(), r[position_rows])
    assert attack.norm == pytest.approx(1.0)
    fgm.remove()


def test_frozen_embedding_still_attacked():
    """PEFT-style frozen embeddings: FGM still finds the gradient of the input rows, perturbs the embedding output
    and never writes the weight."""
    batch = make_batch()
    model = tiny_model()
    model.get_input_embeddings().weight.requires_grad_(False)
    before = model.get_input_embeddings().weight.clone()
    fgm = FGM(model, epsilon=0.5)
    clean_loss = model(**batch).loss
    clean_loss.backward()
    with fgm.perturbed() as attack:
        assert not attack.skipped
        adv_loss = model(**batch).loss
        assert adv_loss > clean_loss
        assert torch.equal(model.get_input_embeddings().weight, before)
        adv_loss.backward()
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert model.get_input_embeddings().weight.grad is None
    fgm.remove()
