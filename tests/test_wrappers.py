"""The embedding is found through the wrappers users put around models: PEFT, torch.compile, DDP (test_ddp.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, make_dataset, make_trainer, state, tiny_model, training_args

from hf_adv.embedding import find_input_embedding


def test_found_through_torch_compile():
    model = tiny_model()
    module, weight = find_input_embedding(torch.compile(model))  # compilation is lazy: nothing is compiled here
    assert module is model.bert.embeddings.word_embeddings and weight is module.weight


@pytest.mark.parametrize("adv_method, vat_weight", [("fgm", 0.0), ("pgd", 0.0), ("none", 1.0)])
def test_lora_model_with_frozen_embeddings(tmp_path, adv_method, vat_weight):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)
    )
    embedding = model.get_base_model().bert.embeddings.word_embeddings
    assert not embedding.weight.requires_grad
    frozen = embedding.weight.detach().clone()
    before = state(model)
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, model=model, adv_method=adv_method, vat_weight=vat_weight, max_steps=2, logging_steps=1
    )
    trainer.add_callback(recorder)
    trainer.train()
    assert torch.equal(embedding.weight, frozen)
    changed = [n for n, v in state(model).items() if not torch.equal(v, before[n])]
    assert changed and all("lora" in n or "classifier" in n for n in changed), changed
    key = "adv_loss" if adv_method != "none" else "vat_loss"
    assert all(key in log and log[key] > 0 for log in recorder.logs if "loss" in log)


# -- the mixin on other trainers ------------------------------------------------------------------------------------


def test_mixin_on_a_users_trainer_subclass(tmp_path):
    """`AdversarialMixin` first among the bases of a user's `Trainer` subclass: its `compute_loss` is used by every
    pass, and the attack runs."""
    from transformers import Trainer

    from hf_adv import AdversarialMixin
    from hf_adv.trainer import AdversarialTrainer

    calls = []

    class WeightedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            calls.append(labels is not None)
            outputs = model(**inputs)
            loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 2.0]))
            return (loss, outputs) if return_outputs else loss

    class AdversarialWeightedTrainer(AdversarialMixin, WeightedTrainer):
        pass

    args = training_args(tmp_path, adv_method="pgd", adv_steps=2, max_steps=2, logging_steps=1)
    trainer = AdversarialWeightedTrainer(model=tiny_model(), args=args, train_dataset=make_dataset(8))
    trainer.train()
    assert all("adv_loss" in h for h in trainer.state.log_history if "loss" in h)
    assert len(calls) == 2 * 3 and all(calls)  # clean, PGD's inner step, adversarial: each with its labels
    assert issubclass(AdversarialTrainer, AdversarialMixin)


def test_mixin_on_trl_sft_trainer(tmp_path):
    """TRL's `SFTTrainer` with the mixin, and a config composed of `AdversarialTrainingArguments` and `SFTConfig`,
    on a tiny GPT-2 and a word-level tokenizer built in memory."""
    trl = pytest.importorskip("trl")
    from dataclasses import dataclass

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from hf_adv import AdversarialMixin, AdversarialTrainingArguments

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="w0", unk_token="w1", eos_token="w2", bos_token="w2"
    )

    @dataclass
    class AdversarialSFTConfig(AdversarialTrainingArguments, trl.SFTConfig):
        pass

    class AdversarialSFTTrainer(AdversarialMixin, trl.SFTTrainer):
        pass

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 12, (16,), generator=g)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 99, (int(n),), generator=g)) for n in lengths]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    head = model.lm_head.weight.detach().clone()
    args = AdversarialSFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.0,
        save_strategy="no",
        max_length=32,
        adv_method="fgm",
        adv_epsilon=0.5,
    )
    trainer = AdversarialSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["adv_loss"] > h["clean_loss"] for h in logs)
    assert torch.equal(model.lm_head.weight, head)  # tied head: never written, and lr 0 moves nothing
