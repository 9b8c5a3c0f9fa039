"""Compatibility matrix (issue 13): every registered method, and VAT, on model families and Trainer features.

Each case is a tiny model built from a config (no download), a few examples and the `Trainer` arguments it needs.
For every case x method the matrix checks that training runs (or is refused at construction with a `ValueError`
naming the fix, for the combinations listed in `Case.refused`), that the attack is applied (its loss is logged and
the weights end up elsewhere than after a plain run with the same seed), and that with a learning rate of 0 every
weight is bit-identical after training (nothing is left perturbed). Then the property each case exists for: a tied
LM head never written, the embedding tap's row gradient on a siamese model, VAT independent of padding, the user's
loss reaching the adversarial pass, the model's own loss unchanged.

Methods come from the registry (`hf_adv.list_methods()`): a method registered tomorrow is tested with its default
flags unless `METHOD_FLAGS` says otherwise.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import assert_equal_dicts, state, training_args
from conftest import tiny_config as bert_config
from datasets import Dataset
from torch import nn
from transformers import (
    BartConfig,
    BartForSequenceClassification,
    BertForMultipleChoice,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import hf_adv
from hf_adv import AdversarialTrainer, AdversarialTrainingArguments
from hf_adv.methods import get_method_class

VOCAB = 99
HIDDEN = 32
SEQ = 10
N_EXAMPLES = 8  # two steps of batch 4


@pytest.fixture(scope="module", autouse=True)
def fast_tiny_models():
    """Tiny models train fastest on one thread, and a frozen heap keeps the `gc.collect()` that accelerate runs at
    the end of every `train()` from scanning every object transformers imported: several times faster together."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


# -- methods: the registry -------------------------------------------------------------------------------------------

# Every registered method, with the flags of its first case in tests/reference.py (they make it bite on a tiny model
# in two steps).
METHODS = hf_adv.list_methods(None)


def method_flags(method: str) -> dict:
    return {**reference.first_case(method).flags, "adv_start_epoch": 0.0}


def metric_key(method: str) -> str:
    cls = get_method_class(method)
    return "adv_loss" if cls.kind == "perturbation" else f"{method}_loss"


def perturbs_embeddings(method: str) -> bool:
    """Whether `method` leaves every weight alone (it perturbs the embedding output, or adds a term): such a method
    has no business writing any weight. AWP perturbs every weight matrix, a tied LM head included, by design."""
    return not get_method_class(method).moves_weights


# -- tiny models ------------------------------------------------------------------------------------------------------


def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return factory


def t5_config(**overrides) -> T5Config:
    config = dict(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        num_labels=2,
    )
    config.update(overrides)
    return T5Config(**config)


def bart_config() -> BartConfig:
    return BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        num_labels=2,
    )


def gpt2_config(**overrides) -> GPT2Config:
    config = dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=2,
        eos_token_id=2,
    )
    config.update(overrides)
    return GPT2Config(**config)


def qwen2_lm() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )


def llama_classifier() -> LlamaForSequenceClassification:
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            num_labels=2,
        )
    )


def deberta_classifier() -> DebertaV2ForSequenceClassification:
    return DebertaV2ForSequenceClassification(
        DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pooler_dropout=0.0,
            num_labels=2,
        )
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class LogitsOnlyClassifier(nn.Module):
    """A user's model: BERT backbone, mean pooling, a linear head; returns a logits tensor and computes no loss."""

    def __init__(self):
        super().__init__()
        self.backbone = BertModel(bert_config(), add_pooling_layer=False)
        self.head = nn.Linear(HIDDEN, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


class DictClassifier(LogitsOnlyClassifier):
    """The same model returning {"loss", "logits"} when given labels."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = super().forward(input_ids, attention_mask)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Siamese(nn.Module):
    """One BERT encoder called on two texts in one forward; a head on (a, b, |a - b|)."""

    def __init__(self, scale_grad_by_freq: bool = False):
        super().__init__()
        self.encoder = BertModel(bert_config(), add_pooling_layer=False)
        if scale_grad_by_freq:
            old = self.encoder.get_input_embeddings()
            new = nn.Embedding(VOCAB, HIDDEN, padding_idx=old.padding_idx, scale_grad_by_freq=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            self.encoder.set_input_embeddings(new)
        self.head = nn.Linear(3 * HIDDEN, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def encode(self, input_ids, attention_mask):
        return mean_pool(
            self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask
        )

    def forward(self, input_ids, attention_mask, input_ids_b, attention_mask_b, labels=None):
        a, b = self.encode(input_ids, attention_mask), self.encode(input_ids_b, attention_mask_b)
        logits = self.head(torch.cat([a, b, (a - b).abs()], dim=-1))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def lora_bert() -> nn.Module:
    peft = pytest.importorskip("peft")
    model = BertForSequenceClassification(bert_config())
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))


# -- users' losses ----------------------------------------------------------------------------------------------------


def cross_entropy(outputs, labels, num_items_in_batch=None):
    """A `compute_loss_func`: mean cross-entropy of the logits, whatever the model returns."""
    logits = outputs if torch.is_tensor(outputs) else outputs["logits"]
    return F.cross_entropy(logits, labels)


class PopLabelsTrainer(AdversarialTrainer):
    """An override as users write it: takes the labels out of `inputs`, runs the model, computes a CE."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = cross_entropy(outputs, labels)
        return (loss, outputs) if return_outputs else loss


class LossOnlyTrainer(AdversarialTrainer):
    """An override that returns the loss alone, even when asked for the outputs too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return F.cross_entropy(outputs.logits, inputs["labels"])


# -- tiny data --------------------------------------------------------------------------------------------------------


def padded_ids(g, n=N_EXAMPLES, seq=SEQ, pad_id=0, eos_id=None, shape=()):
    """Token ids >= 3 (never a special token), right-padded to `seq` with lengths seq, seq-1, seq-2, seq-3, ..."""
    ids = torch.randint(3, VOCAB, (n, *shape, seq), generator=g)
    lengths = seq - torch.arange(n) % 4
    mask = (torch.arange(seq) < lengths.view(-1, *([1] * len(shape)), 1)).expand_as(ids)
    if eos_id is not None:
        ids = torch.where(torch.arange(seq) == (lengths - 1).view(-1, *([1] * len(shape)), 1), eos_id, ids)
    ids = torch.where(mask, ids, pad_id)
    return ids, mask.long()


def to_dataset(columns: dict) -> Dataset:
    return Dataset.from_dict({k: v.tolist() for k, v in columns.items()})


def classification_data(pad_id=0, eos_id=None, seed=1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids, mask = padded_ids(g, pad_id=pad_id, eos_id=eos_id)
    return to_dataset(
        {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (N_EXAMPLES,), generator=g)}
    )


def token_classification_data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_ids(g)
    labels = torch.randint(0, 3, (N_EXAMPLES, SEQ), generator=g).masked_fill(mask == 0, -100)
    return to_dataset({"input_ids": ids, "attention_mask": mask, "labels": labels})


def regression_data(targets: int) -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_ids(g)
    labels = torch.randn((N_EXAMPLES,) if targets == 1 else (N_EXAMPLES, targets), generator=g)
    return to_dataset({"input_ids": ids, "attention_mask": mask, "labels": labels})


def multiple_choice_data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_ids(g, shape=(2,))
    return to_dataset(
        {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (N_EXAMPLES,), generator=g)}
    )


def seq2seq_data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids, mask = padded_ids(g, eos_id=1)
    labels = torch.randint(3, VOCAB, (N_EXAMPLES, 6), generator=g)
    labels[1::2, -2:] = -100  # padded targets
    return to_dataset({"input_ids": ids, "attention_mask": mask, "labels": labels})


def causal_lm_data(prompt: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (N_EXAMPLES, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100  # the prompt is not trained on
    return to_dataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})


def siamese_data() -> Dataset:
    g = torch.Generator().manual_seed(1)
    a, mask_a = padded_ids(g)
    b, mask_b = padded_ids(g, seq=7)  # the second text is shorter: two lookups of different shapes
    labels = torch.randint(0, 2, (N_EXAMPLES,), generator=g)
    return to_dataset(
        {"input_ids": a, "attention_mask": mask_a, "input_ids_b": b, "attention_mask_b": mask_b, "labels": labels}
    )


# -- the cases --------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    model: Callable[[], nn.Module]
    data: Callable[[], Dataset] = classification_data
    args: dict = field(default_factory=dict)
    trainer_cls: type = AdversarialTrainer
    trainer_kwargs: Callable[[], dict] = dict
    # method -> regular expression the construction-time ValueError must match
    refused: dict[str, str] = field(default_factory=dict)
    slow: bool = False


def bert() -> nn.Module:
    return BertForSequenceClassification(bert_config())


def bf16_bert() -> nn.Module:
    return BertForSequenceClassification(bert_config()).to(torch.bfloat16)


# PGD's inner steps and VAT's power iteration differentiate with `torch.autograd.grad`, which reentrant
# checkpointing does not support; the refusal must tell the user to pass use_reentrant=False.
# Dynamo (graph capture, guards on hooks) is what an attack can trip over; inductor adds code generation only, and
# costs much more here: the torch_compile cases took 44 s with inductor (57 s with an empty inductor cache) against
# 19 s with aot_eager, on 2 shared CPU cores.
COMPILE_BACKEND = "aot_eager"
NO_GRAD_UNDER_REENTRANT = {
    method: "use_reentrant"
    for method in METHODS
    if get_method_class(method).needs_input_gradient(
        AdversarialTrainingArguments(output_dir="unused", report_to="none", **method_flags(method))
    )
}
KEEP_LABELS = dict(label_names=["labels"])  # the forward has no `labels` argument: keep the column anyway

CASES: dict[str, Case] = {
    "bert_classification": Case(seeded(bert)),
    "custom_logits_loss_func": Case(
        seeded(LogitsOnlyClassifier), args=KEEP_LABELS, trainer_kwargs=lambda: dict(compute_loss_func=cross_entropy)
    ),
    "custom_logits_pop_labels": Case(seeded(LogitsOnlyClassifier), args=KEEP_LABELS, trainer_cls=PopLabelsTrainer),
    "custom_dict": Case(seeded(DictClassifier)),
    "loss_only_override": Case(seeded(bert), trainer_cls=LossOnlyTrainer),
    "label_smoothing": Case(seeded(bert), args=dict(label_smoothing_factor=0.1)),
    "compute_loss_func": Case(seeded(bert), trainer_kwargs=lambda: dict(compute_loss_func=cross_entropy)),
    "token_classification": Case(
        seeded(lambda: BertForTokenClassification(bert_config(num_labels=3))), token_classification_data
    ),
    "regression": Case(
        seeded(lambda: BertForSequenceClassification(bert_config(num_labels=1))),
        lambda: regression_data(1),
    ),
    "multi_target_regression": Case(
        seeded(lambda: BertForSequenceClassification(bert_config(num_labels=3, problem_type="regression"))),
        lambda: regression_data(3),
    ),
    "multiple_choice": Case(seeded(lambda: BertForMultipleChoice(bert_config())), multiple_choice_data),
    "t5_classification": Case(
        seeded(lambda: T5ForSequenceClassification(t5_config())), lambda: classification_data(pad_id=0, eos_id=1)
    ),
    "bart_classification": Case(
        seeded(lambda: BartForSequenceClassification(bart_config())), lambda: classification_data(pad_id=1, eos_id=2)
    ),
    "t5_seq2seq": Case(seeded(lambda: T5ForConditionalGeneration(t5_config())), seq2seq_data),
    "qwen2_tied_lm": Case(seeded(qwen2_lm), causal_lm_data),
    "qwen2_tied_lm_masked_prompt": Case(seeded(qwen2_lm), lambda: causal_lm_data(prompt=4)),
    "gpt2_tied_lm": Case(seeded(lambda: GPT2LMHeadModel(gpt2_config(tie_word_embeddings=True))), causal_lm_data),
    "gpt2_tied_lm_masked_prompt": Case(
        seeded(lambda: GPT2LMHeadModel(gpt2_config(tie_word_embeddings=True))), lambda: causal_lm_data(prompt=4)
    ),
    "llama_classification": Case(seeded(llama_classifier)),
    "deberta_v2_classification": Case(seeded(deberta_classifier)),
    "gpt2_classification": Case(
        seeded(lambda: GPT2ForSequenceClassification(gpt2_config(pad_token_id=0, num_labels=2)))
    ),
    "siamese": Case(seeded(Siamese), siamese_data),
    "lora": Case(seeded(lora_bert)),
    "gradient_checkpointing": Case(
        seeded(bert), args=dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    ),
    "gradient_checkpointing_reentrant": Case(
        seeded(bert),
        args=dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
        refused=NO_GRAD_UNDER_REENTRANT,
    ),
    "torch_compile": Case(
        seeded(bert),
        # Two clean compiled steps, then two attacked ones: the attack starts on an already compiled model.
        args=dict(torch_compile=True, torch_compile_backend=COMPILE_BACKEND, adv_start_step=2, max_steps=4),
        slow=True,
    ),
    # SGD on bf16 weights needs a larger step than 1e-3 to move them at all.
    "bf16_weights": Case(seeded(bf16_bert), args=dict(learning_rate=1e-2)),
}


def case_params(include: Callable[[Case, str], bool]):
    return [
        pytest.param(case, method, id=f"{case}-{method}", marks=[pytest.mark.slow] if spec.slow else [])
        for case, spec in CASES.items()
        for method in METHODS
        if include(spec, method)
    ]


TRAINING = case_params(lambda spec, method: method not in spec.refused)
REFUSED = case_params(lambda spec, method: method in spec.refused)


def build_trainer(tmp_path, case: str, method: str | None = None, **overrides) -> AdversarialTrainer:
    spec = CASES[case]
    args = dict(max_steps=2, logging_steps=1)
    if method is not None and reference.first_case(method).steps > 1:
        args["max_steps"] = 4  # a perturbation carried over between steps needs more steps to show
    args.update(spec.args)
    if method is not None:
        args.update(method_flags(method))
    args.update(overrides)
    return spec.trainer_cls(
        model=spec.model(), args=training_args(tmp_path, **args), train_dataset=spec.data(), **spec.trainer_kwargs()
    )


def train_logs(trainer: Trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


_PLAIN_WEIGHTS: dict[str, dict[str, torch.Tensor]] = {}


def plain_weights(tmp_path, case: str) -> dict[str, torch.Tensor]:
    """Weights after the same run with adv_method='none' and no VAT (one run per case)."""
    if case not in _PLAIN_WEIGHTS:
        trainer = build_trainer(tmp_path / "plain", case, adv_method="none", vat_weight=0.0)
        trainer.train()
        _PLAIN_WEIGHTS[case] = state(trainer.model)
    return _PLAIN_WEIGHTS[case]


# -- the matrix -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, method", TRAINING)
def test_trains_and_applies_the_attack(tmp_path, case, method):
    trainer = build_trainer(tmp_path / "adv", case, method)
    trainer.train()
    logs = train_logs(trainer)
    start = CASES[case].args.get("adv_start_step", 0)
    key = metric_key(method)
    assert all(key not in log for log in logs if log["step"] <= start), logs
    attacked = [log for log in logs if log["step"] > start]
    assert attacked and all(key in log and math.isfinite(log[key]) for log in attacked), logs
    cls = get_method_class(method)
    for log in attacked:
        assert all(log.get(name, 0) == 0 for name in cls.summed_metrics), log  # nothing skipped
        if cls.kind == "perturbation" and "clean_loss" in log:
            # The adversarial loss is another loss than the clean one: something was perturbed.
            assert log[key] != log["clean_loss"], log
        elif cls.kind == "perturbation":  # a method that runs no clean pass (FreeLB, carried FGM)
            assert "adv_perturbation_norm" in log, log
    plain = plain_weights(tmp_path, case)
    trained = state(trainer.model)
    assert trained.keys() == plain.keys()
    moved = max((v.float() - plain[n].float()).abs().max().item() for n, v in trained.items())
    assert moved > 1e-6, f"the weights are those of a plain run (largest difference {moved})"


@pytest.mark.parametrize("case, method", TRAINING)
def test_learning_rate_zero_leaves_every_weight_bit_identical(tmp_path, case, method):
    trainer = build_trainer(tmp_path, case, method, learning_rate=0.0)
    initial = state(trainer.model)
    trainer.train()
    assert metric_key(method) in train_logs(trainer)[-1], "the attack did not run"
    assert_equal_dicts(state(trainer.model), initial)


@pytest.mark.parametrize("case, method", REFUSED)
def test_refused_at_construction_with_the_fix_named(tmp_path, case, method):
    with pytest.raises(ValueError, match=CASES[case].refused[method]):
        build_trainer(tmp_path, case, method)


def test_reentrant_checkpointing_allows_single_step_pgd(tmp_path):
    """Only PGD's inner steps need `autograd.grad`: with one step there are none, and nothing to refuse."""
    trainer = build_trainer(tmp_path, "gradient_checkpointing_reentrant", "pgd", adv_steps=1)
    trainer.train()
    assert all("adv_loss" in log for log in train_logs(trainer))


# -- tied LM heads: the head is never written ------------------------------------------------------------------------

TIED_CASES = [
    "qwen2_tied_lm",
    "qwen2_tied_lm_masked_prompt",
    "gpt2_tied_lm",
    "gpt2_tied_lm_masked_prompt",
    "t5_seq2seq",
]


@pytest.mark.parametrize("case", TIED_CASES)
@pytest.mark.parametrize("method", [m for m in METHODS if perturbs_embeddings(m)])
def test_tied_lm_head_is_never_written(tmp_path, case, method):
    """Perturbing the input embedding must not perturb the output projection that shares its weight."""
    trainer = build_trainer(tmp_path, case, method, learning_rate=0.0)
    model = trainer.model
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight, "the test needs a tied model"
    initial = head.weight.detach().clone()
    seen = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(torch.equal(module.weight, initial)))
    try:
        trainer.train()
    finally:
        hook.remove()
    assert metric_key(method) in train_logs(trainer)[-1], "the attack did not run"
    assert seen and all(seen), f"the head saw a perturbed weight in {seen.count(False)} of {len(seen)} forwards"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "the tie was broken"
    assert torch.equal(model.get_output_embeddings().weight, initial)


# -- the embedding tap: row gradients equal the true weight.grad rows ------------------------------------------------


@pytest.mark.parametrize("scale_grad_by_freq", [False, True], ids=["plain_embedding", "scale_grad_by_freq"])
def test_siamese_tap_row_gradient_equals_weight_grad(scale_grad_by_freq):
    torch.manual_seed(0)
    model = Siamese(scale_grad_by_freq=scale_grad_by_freq)
    g = torch.Generator().manual_seed(3)
    # A small id range, so tokens repeat within each text and across the two (scale_grad_by_freq counts them).
    a = torch.randint(3, 12, (4, SEQ), generator=g)
    b = torch.cat([a[:, :4], torch.randint(3, 12, (4, 3), generator=g)], dim=1)
    a[:, -2:] = 0  # padding, the padding row's gradient is zero
    batch = dict(
        input_ids=a,
        attention_mask=(a != 0).long(),
        input_ids_b=b,
        attention_mask_b=torch.ones_like(b),
        labels=torch.tensor([0, 1, 1, 0]),
    )
    method = hf_adv.FGM(model)
    try:
        with method.capture():
            model(**batch)["loss"].backward()
            rows, grad = method.tap.captured_gradient()
    finally:
        method.remove()
    assert torch.equal(rows, torch.unique(rows)), "each row once"
    assert set(rows.tolist()) <= set(torch.cat([a.reshape(-1), b.reshape(-1)]).tolist()), "only looked-up rows"
    dense = torch.zeros(VOCAB, HIDDEN)
    dense[rows] = grad.float()
    torch.testing.assert_close(dense, model.get_input_embeddings().weight.grad, atol=1e-7, rtol=1e-5)


# -- VAT does not depend on padding -----------------------------------------------------------------------------------

MAX_NOISE_LEN = 64


@pytest.fixture
def padding_free_vat_noise(monkeypatch):
    """VAT's random start, the same for a token whatever the padding after it (a prefix of one fixed draw)."""
    from hf_adv.methods.vat import VAT

    def noise(self, shape, like):
        g = torch.Generator().manual_seed(1234)
        full = torch.randn((shape[0], MAX_NOISE_LEN, *shape[2:]), generator=g)
        return full[:, : shape[1]].to(like.device)

    monkeypatch.setattr(VAT, "sample_noise", noise)


@pytest.mark.parametrize("task", ["token_classification", "sequence_classification"])
def test_vat_loss_does_not_depend_on_padding(tmp_path, padding_free_vat_noise, task):
    """The same sentence with 0, 6 or 18 pad tokens after it: the same clean loss and the same VAT loss."""
    g = torch.Generator().manual_seed(7)
    sentence = torch.randint(3, VOCAB, (8,), generator=g)
    token_labels = torch.randint(0, 3, (8,), generator=g)
    losses = {}
    for pads in (0, 6, 18):
        ids = torch.cat([sentence, torch.zeros(pads, dtype=torch.long)]).unsqueeze(0)
        if task == "token_classification":
            model = seeded(lambda: BertForTokenClassification(bert_config(num_labels=3)))()
            labels = torch.cat([token_labels, torch.full((pads,), -100)]).unsqueeze(0)
        else:
            model = seeded(bert)()
            with torch.no_grad():  # confident predictions: a KL large enough for the 6 decimals it is logged with
                model.classifier.weight.mul_(30.0)
            labels = torch.tensor([1])
        args = dict(vat_weight=1.0, learning_rate=0.0, max_steps=1, logging_steps=1, per_device_train_batch_size=1)
        trainer = AdversarialTrainer(
            model=model,
            args=training_args(tmp_path / str(pads), **args),
            train_dataset=to_dataset({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}),
        )
        trainer.train()
        (log,) = train_logs(trainer)
        losses[pads] = (log["loss"], log["vat_loss"])
    clean = {pads: value[0] for pads, value in losses.items()}
    vat = {pads: value[1] for pads, value in losses.items()}
    assert clean[6] == pytest.approx(clean[0], rel=1e-5) and clean[18] == pytest.approx(clean[0], rel=1e-5), clean
    assert vat[0] > 1e-3, vat  # large enough for the 6 decimals it is logged with
    same = dict(rel=1e-4, abs=2e-6)
    assert vat[6] == pytest.approx(vat[0], **same) and vat[18] == pytest.approx(vat[0], **same), vat


@pytest.mark.parametrize(
    "case, reference",
    [
        ("custom_logits_loss_func", "custom_dict"),
        ("custom_logits_pop_labels", "custom_dict"),
        ("loss_only_override", "bert_classification"),
        ("label_smoothing", "bert_classification"),
        ("compute_loss_func", "bert_classification"),
    ],
)
def test_vat_sees_the_same_logits_whatever_the_loss_and_output_format(
    tmp_path, deterministic_vat_noise, case, reference
):
    """VAT compares the model's predictions: how the supervised loss is computed, and whether the model returns a
    tensor or a dict, must not change its value (same weights, same batch, same noise)."""

    def vat_loss(name: str) -> float:
        trainer = build_trainer(tmp_path / name, name, "vat", vat_epsilon=4.0, learning_rate=0.0, max_steps=1)
        trainer.train()
        (log,) = train_logs(trainer)
        return log["vat_loss"]

    assert vat_loss(case) == pytest.approx(vat_loss(reference), rel=1e-5, abs=2e-6)


# -- the user's loss reaches the adversarial pass -------------------------------------------------------------------

USER_LOSS_CASES = [
    "label_smoothing",
    "compute_loss_func",
    "custom_logits_loss_func",
    "custom_logits_pop_labels",
    "loss_only_override",
]


@pytest.mark.parametrize("case", USER_LOSS_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_adversarial_pass_gets_the_labels(tmp_path, case, method):
    """Every loss of a step (clean, adversarial, PGD's inner steps, the regularizers' forwards) goes through the
    user's loss, with labels."""
    steps = reference.first_case(method).steps  # carried FGM has one pass per step: two steps show the second
    trainer = build_trainer(tmp_path, case, method, max_steps=steps)
    calls = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        calls.append("labels" in inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    assert len(calls) >= 2 and all(calls), calls
    log = train_logs(trainer)[-1]
    assert math.isfinite(log[metric_key(method)]) and log[metric_key(method)] >= 0, log


# -- the model's own loss is unchanged --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt2_tied_lm_masked_prompt", "qwen2_tied_lm_masked_prompt", "t5_seq2seq"])
def test_none_logs_the_loss_of_a_plain_trainer(tmp_path, case):
    """Labels of -100 in a model that computes its own (shifted, for causal LMs) loss: the trainer must not
    replace that loss, so adv_method='none' gives the losses and weights of a plain `Trainer`."""
    spec = CASES[case]
    plain = Trainer(
        model=spec.model(),
        args=training_args(tmp_path / "plain", TrainingArguments, max_steps=2, logging_steps=1),
        train_dataset=spec.data(),
    )
    plain.train()
    ours = build_trainer(tmp_path / "ours", case, adv_method="none", vat_weight=0.0)
    ours.train()
    losses = lambda t: [log["loss"] for log in train_logs(t)]  # noqa: E731
    assert losses(ours) == losses(plain)
    assert_equal_dicts(state(ours.model), state(plain.model))


# -- AWP on bf16 weights ----------------------------------------------------------------------------------------------


def test_awp_on_bf16_weights_with_default_eps_is_refused(tmp_path):
    """awp_eps=1e-3 is below bf16's resolution (relative spacing 2^-7): the perturbation would round away."""
    with pytest.raises(ValueError, match=r"(?i)bf16|bfloat16|resolution"):
        build_trainer(tmp_path, "bf16_weights", adv_method="awp", adv_start_epoch=0.0)


def test_awp_on_bf16_weights_moves_them_with_a_large_eps(tmp_path):
    trainer = build_trainer(tmp_path, "bf16_weights", "awp", learning_rate=0.0)
    model = trainer.model
    initial = state(model)
    moved = []
    hook = model.register_forward_pre_hook(
        lambda module, args: moved.append(any(not torch.equal(p, initial[n]) for n, p in module.named_parameters()))
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    assert any(moved), "no forward saw a perturbed weight"
    assert_equal_dicts(state(model), initial)
