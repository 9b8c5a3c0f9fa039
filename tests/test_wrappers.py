"""The embedding is found through the wrappers users put around models: PEFT, torch.compile, DDP (test_ddp.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, make_trainer, state, tiny_model

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
