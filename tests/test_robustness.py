"""Robustness evaluation: the attacks really attack, the minimal perturbation is where the prediction flips, the word
attack keeps to words and to its budget, and evaluation leaves the model as it found it."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import VOCAB, state, tiny_config, training_args
from transformers import BertForSequenceClassification, BertTokenizer, DataCollatorWithPadding

from hf_adv import AdversarialTrainer
from hf_adv.robustness import RobustnessEvaluator, adversarial_accuracy, build_dataloader, evaluate_robustness, main

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]"]
WORDS = [f"w{i}" for i in range(len(SPECIAL), 89)]
FRAGMENTS = [f"##f{i}" for i in range(89, VOCAB)]
EPSILONS = [0.01, 0.03, 0.06, 0.12]
MAX_EPSILON = 1.0


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Two classes drawing their words from overlapping halves of the vocabulary; some words carry a fragment."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        low, high = (7, 51) if label == 0 else (45, 89)
        words = []
        for i in torch.randint(low, high, (int(torch.randint(6, 13, (1,), generator=g)),), generator=g).tolist():
            fragment = FRAGMENTS[int(torch.randint(0, len(FRAGMENTS), (1,), generator=g))][2:]
            words.append(f"w{i}{fragment}" if torch.rand(1, generator=g) < 0.15 else f"w{i}")
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run much faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS + FRAGMENTS) + "\n")
    return BertTokenizer(str(path), do_lower_case=False)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """The tiny BERT trained for 60 steps on the synthetic task, far above chance. The word embeddings stay frozen,
    as fine-tuning barely moves pretrained ones: their neighbourhoods then mix the classes, as real ones do."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    rows = synthetic_rows(640, seed=0)
    encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(60):
        index = torch.arange(step * 32, step * 32 + 32) % len(rows)
        loss = model(
            input_ids=encoded["input_ids"][index],
            attention_mask=encoded["attention_mask"][index],
            labels=labels[index],
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    return model


@pytest.fixture(scope="module")
def test_rows():
    return synthetic_rows(96, seed=1)


@pytest.fixture(scope="module")
def metrics(trained, tokenizer, test_rows):
    return evaluate_robustness(
        trained, test_rows, tokenizer, epsilons=EPSILONS, max_epsilon=MAX_EPSILON, word_budget=0.3, disable_tqdm=True
    )


def a_batch(tokenizer, rows):
    return DataCollatorWithPadding(tokenizer)([{**tokenizer(r["text"]), "labels": r["label"]} for r in rows])


def test_embedding_attacks_attack(metrics):
    assert metrics["num_examples"] == 96
    assert metrics["clean_accuracy"] > 0.9
    pgd = [metrics[f"pgd_accuracy@{e:g}"] for e in EPSILONS]
    fgm = [metrics[f"fgm_accuracy@{e:g}"] for e in EPSILONS]
    assert pgd[-1] < metrics["clean_accuracy"] - 0.3, pgd
    assert all(a >= b for a, b in zip(pgd, pgd[1:])), pgd  # non-increasing in epsilon
    assert pgd[0] > pgd[-1]  # and it does fall
    assert all(p <= f for p, f in zip(pgd, fgm)), (pgd, fgm)  # PGD at least as strong as FGM
    assert any(p < f for p, f in zip(pgd, fgm)), (pgd, fgm)


def test_cost_is_reported_by_part(metrics):
    parts = [metrics[f"seconds_{part}"] for part in ("clean", "fgm_pgd", "min_perturbation", "word")]
    assert all(seconds > 0 for seconds in parts)
    # The parts run inside the total; each figure is rounded to 0.01 s, so the sum may exceed the rounded total by
    # up to 0.005 s per figure.
    assert sum(parts) <= metrics["seconds"] + 0.005 * (len(parts) + 1)
    assert metrics["backward_passes_per_example"] >= 1 and metrics["forward_passes_per_example"] > 3


def test_perturbations_stay_in_the_ball_and_off_padding(trained, tokenizer, test_rows):
    evaluator = RobustnessEvaluator(trained, epsilons=[0.06], attacks=["fgm", "pgd"])
    batch = a_batch(tokenizer, test_rows[:24])
    padding = batch["attention_mask"] == 0
    assert padding.any()
    seen = []
    shifted = evaluator.tap.shifted

    def recording(delta):
        seen.append(delta.detach().clone())
        return shifted(delta)

    evaluator.tap.shifted = recording
    evaluator.pgd(batch, 0.06)
    assert len(seen) >= evaluator.pgd_steps
    full = [d for d in seen if d.shape[0] == 24]
    assert any(torch.allclose(d.flatten(1).norm(dim=1), torch.full((24,), 0.06)) for d in full)  # FGM: on the sphere
    for delta in seen:
        assert torch.all(delta.flatten(1).norm(dim=1) <= 0.06 * (1 + 1e-5))
    for delta in full:
        assert torch.all(delta[padding] == 0)


@pytest.mark.parametrize("seeded", [False, True], ids=["bisection", "seeded-by-pgd-grid"])
def test_minimal_perturbation_is_where_the_prediction_flips(trained, tokenizer, test_rows, metrics, seeded):
    attacks = ["pgd", "min_perturbation"] if seeded else ["min_perturbation"]
    evaluator = RobustnessEvaluator(trained, epsilons=EPSILONS, attacks=attacks, max_epsilon=MAX_EPSILON)
    batch = a_batch(tokenizer, test_rows[:24])
    result = evaluator.minimal_perturbation(batch)
    upper, lower = result["upper"], result["lower"]
    flipped = torch.isfinite(upper)
    assert flipped.float().mean() > 0.9
    assert torch.all(upper[flipped] - lower[flipped] <= MAX_EPSILON / 2**evaluator.bisection_steps + 1e-6)
    assert torch.all(evaluator.prediction_flips(batch, torch.where(flipped, upper, MAX_EPSILON))[flipped])  # above
    assert not torch.any(evaluator.prediction_flips(batch, lower))  # just below
    if seeded:  # the bracket from the grid gives the same answer within the precision
        plain = RobustnessEvaluator(trained, attacks=["min_perturbation"], max_epsilon=MAX_EPSILON)
        other = plain.minimal_perturbation(batch)["upper"]
        assert (other - upper).abs().max() <= 2 * MAX_EPSILON / 2**evaluator.bisection_steps + 1e-6
    # The data set summary is in the range of the per-example values.
    assert 0 < metrics["min_perturbation_median"] < MAX_EPSILON
    assert metrics["min_perturbation_unflipped"] < 0.1


def test_word_attack_keeps_special_tokens_and_budget(trained, tokenizer, test_rows, metrics):
    evaluator = RobustnessEvaluator(trained, tokenizer, attacks=["word"], word_budget=2)
    batch = a_batch(tokenizer, test_rows[:48])
    result = evaluator.word_attack(batch)
    again = evaluator.word_attack(batch)
    assert torch.equal(result.input_ids, again.input_ids)  # deterministic
    original = batch["input_ids"]
    changed = result.input_ids != original
    assert torch.equal(changed, result.changed)
    assert changed.any()
    assert torch.all(changed.sum(1) <= 2) and torch.all(result.budget <= 2)
    special = torch.tensor(tokenizer.all_special_ids + [5, 6])  # [unused0], [unused1]
    fragment = original >= 89
    assert not torch.isin(original[changed], special).any()  # never replaces a special token
    assert not torch.isin(result.input_ids[changed], special).any()  # nor inserts one
    assert not fragment[changed].any() and not (result.input_ids[changed] >= 89).any()  # nor fragments
    followed_by_fragment = torch.zeros_like(changed)
    followed_by_fragment[:, :-1] = fragment[:, 1:]
    assert not (changed & followed_by_fragment).any()  # only whole words
    assert torch.equal(result.input_ids[~result.attacked], original[~result.attacked])
    assert 0 < metrics["word_attack_success_rate"] <= 1
    assert metrics["word_attack_accuracy"] <= metrics["clean_accuracy"]
    assert 0 < metrics["word_attack_fraction_changed"] <= 0.3 + 1e-9


def test_evaluation_leaves_the_model_as_found(trained, tokenizer, test_rows):
    model = trained
    before = state(model)
    model.train()
    model.bert.encoder.layer[0].eval()  # a mixed state is restored module by module
    model.classifier.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    try:
        evaluate_robustness(
            model, test_rows[:16], tokenizer, epsilons=[1.0], bisection_steps=2, word_budget=2, disable_tqdm=True
        )
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(torch.get_rng_state(), rng)  # a trainer's dropout after evaluation is not shifted
        assert not model.classifier.weight.requires_grad
        assert all(p.requires_grad for n, p in model.named_parameters() if n != "classifier.weight")
        assert all(p.grad is None for p in model.parameters())
        after = state(model)
        assert all(torch.equal(after[n], before[n]) for n in before)
        for hooks in (m._forward_hooks for m in model.modules()):
            assert not hooks
    finally:
        model.eval()
        model.classifier.weight.requires_grad_(True)


def test_multi_label(tokenizer, test_rows):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    rows = [
        {"text": r["text"], "labels": [r["label"], 2] if i % 2 else str(r["label"])} for i, r in enumerate(test_rows)
    ]
    result = evaluate_robustness(
        model, rows[:32], tokenizer, label_column="labels", epsilons=[0.03, 0.12], bisection_steps=3, disable_tqdm=True
    )
    assert 0 <= result["pgd_accuracy@0.12"] <= result["pgd_accuracy@0.03"] <= result["clean_accuracy"] <= 1
    assert result["pgd_accuracy@0.12"] <= result["fgm_accuracy@0.12"]
    assert 0 <= result["word_attack_success_rate"] <= 1 and 0 <= result["min_perturbation_unflipped"] <= 1


def test_adversarial_accuracy_matches_full_evaluation(trained, tokenizer, test_rows, metrics):
    loader = build_dataloader(test_rows, tokenizer, batch_size=32)
    result = adversarial_accuracy(trained, loader, [0.03, 0.06], disable_tqdm=True)
    assert result == {
        "adv_accuracy@0.03": metrics["pgd_accuracy@0.03"],
        "adv_accuracy@0.06": metrics["pgd_accuracy@0.06"],
    }


def test_cli_writes_json_table_and_plot(tmp_path, trained, tokenizer, test_rows):
    import pandas as pd

    trained.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pd.DataFrame(test_rows[:24]).to_csv(tmp_path / "test.csv", index=False)
    common = ["--dataset", str(tmp_path / "test.csv"), "--epsilons", "0.03", "0.12", "--bisection_steps", "2"]
    common += ["--word_budget", "2", "--disable_tqdm", "true"]
    main(
        ["--model_paths", str(tmp_path / "model"), "--model_names", "a", "--output_dir", str(tmp_path / "a"), *common]
    )
    main(
        ["--model_paths", str(tmp_path / "model"), "--model_names", "b", "--num_examples", "12"]
        + ["--results", str(tmp_path / "a" / "robustness.json"), "--output_dir", str(tmp_path / "ab"), *common]
    )
    report = json.loads((tmp_path / "ab" / "robustness.json").read_text())["models"]
    assert list(report) == ["a", "b"] and report["a"]["num_examples"] == 24 and report["b"]["num_examples"] == 12
    table = (tmp_path / "ab" / "robustness.md").read_text().splitlines()
    assert len(table) == 6 and "PGD-5 eps 0.12" in table[0] and table[-1].startswith("Accuracy, ")
    assert (tmp_path / "ab" / "robustness.png").stat().st_size > 1000
    assert not math.isnan(report["b"]["word_attack_success_rate"])


def test_trainer_evaluate_reports_accuracy_under_attack(tmp_path, trained, tokenizer, test_rows):
    dataset = [{**tokenizer(r["text"]), "labels": r["label"]} for r in test_rows[:32]]
    args = training_args(tmp_path, robust_eval_epsilons=[0.03, 0.12], per_device_eval_batch_size=16)
    trainer = AdversarialTrainer(
        model=trained, args=args, eval_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)
    )
    before = state(trained)
    result = trainer.evaluate()
    assert result["eval_adv_accuracy@0.12"] < result["eval_adv_accuracy@0.03"] <= 1
    assert any("eval_adv_accuracy@0.12" in h for h in trainer.state.log_history)
    assert all(torch.equal(v, before[n]) for n, v in state(trained).items())
    predicted = trainer.predict(dataset)
    assert not any("adv_accuracy" in k for k in predicted.metrics)  # predict() is never attacked


def test_cli_runs_as_a_module_without_warnings():
    """`python -m hf_adv.robustness` must not find its module imported already (through `hf_adv`) before it runs."""
    import subprocess
    import sys

    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "hf_adv.robustness", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--model_paths" in done.stdout and "--epsilons" in done.stdout


def test_plot_title_names_only_the_attacks_shown():
    from hf_adv.robustness.report import _plot_title

    pgd_only = {"m": {"clean_accuracy": 0.8, "pgd_accuracy@0.1": 0.6, "pgd_steps": 5}}
    both = {"m": {**pgd_only["m"], "fgm_accuracy@0.1": 0.7}}
    assert _plot_title(pgd_only, "accuracy") == "accuracy under PGD-5 (solid)"
    assert _plot_title(both, "accuracy") == "accuracy under PGD-5 (solid) and FGM (dashed)"
    assert (
        _plot_title({"m": {"clean_accuracy": 0.8, "fgm_accuracy@0.1": 0.7}}, "micro-F1")
        == "micro-F1 under FGM (dashed)"
    )


def test_plot_gives_one_colour_per_model_whatever_the_attack_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hf_adv.robustness.report import plot_accuracy

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path: saved.append(self))
    row = {"clean_accuracy": 0.8, "pgd_accuracy@0.1": 0.6, "pgd_steps": 5}
    results = {
        "distilled (ce attack)": {**row, "attack_loss": "ce"},
        "distilled (margin attack)": {**row, "pgd_accuracy@0.1": 0.4, "attack_loss": "margin"},
        "plain": {**row, "attack_loss": "ce"},
    }
    plot_accuracy(results, tmp_path / "p.png")
    axes = saved[0].axes[0]
    model_legend, attack_legend = axes.artists[0], axes.get_legend()
    assert [t.get_text() for t in model_legend.get_texts()] == ["distilled", "plain"]
    assert [t.get_text() for t in attack_legend.get_texts()] == ["PGD-5", "cross-entropy loss", "margin loss"]
    ce, margin, plain = axes.get_lines()
    assert ce.get_color() == margin.get_color() != plain.get_color() and margin.get_alpha() < 1


def test_table_footnote_gives_the_units_of_the_columns_it_has():
    from hf_adv.robustness import markdown_table

    grid = {"m": {"clean_accuracy": 0.8, "pgd_accuracy@0.1": 0.6, "pgd_steps": 5, "metric": "f1_micro"}}
    footnote = markdown_table(grid).strip().splitlines()[-1]
    assert footnote == "Micro-F1 in %; epsilon in L2 norm per example of the input embedding output."
    full = {"m": {**grid["m"], "metric": "accuracy", "min_perturbation_mean": 0.3, "word_attack_success_rate": 0.8}}
    footnote = markdown_table(full).strip().splitlines()[-1]
    assert footnote.startswith("Accuracy, success rates and tokens changed in %; epsilon and minimal perturbation")


def test_margin_loss_is_the_logit_difference():
    from hf_adv.robustness import margin_loss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    # Row 1: true class 0, best other 0.5 -> -1.5; row 2: true class 2, best other 3.0 -> 2.0.
    assert margin_loss(logits, torch.tensor([0, 2]), multi_label=False).item() == pytest.approx(0.5)
    multi = torch.tensor([[2.0, -1.0]])
    # -z for the true label 0, +z for the false label 1: -2 - 1.
    assert margin_loss(multi, torch.tensor([[1.0, 0.0]]), multi_label=True).item() == pytest.approx(-3.0)


def test_margin_attack_sees_through_a_saturated_softmax(trained, tokenizer):
    """Defensive distillation's effect, made extreme: logits scaled by 1e4 saturate the softmax, so the cross-entropy
    has no gradient on confidently classified examples and PGD on it finds nothing, while PGD on the margin is not
    fooled (Carlini and Wagner 2016): the same model, the same radius, lower accuracy under the margin attack."""
    saturated = copy.deepcopy(trained)
    with torch.no_grad():
        saturated.classifier.weight.mul_(1e4)
        saturated.classifier.bias.mul_(1e4)
    rows = synthetic_rows(64, seed=3)
    kwargs = dict(epsilons=[0.5], attacks=["pgd"], disable_tqdm=True, max_length=16)
    original = evaluate_robustness(trained, rows, tokenizer, **kwargs)
    ce = evaluate_robustness(saturated, rows, tokenizer, attack_loss="ce", **kwargs)
    margin = evaluate_robustness(saturated, rows, tokenizer, attack_loss="margin", **kwargs)
    assert ce["clean_accuracy"] == margin["clean_accuracy"] == original["clean_accuracy"]
    assert original["pgd_accuracy@0.5"] < original["clean_accuracy"]  # the radius does fool the unscaled model
    assert ce["pgd_accuracy@0.5"] > original["pgd_accuracy@0.5"]  # the saturated softmax hides the gradient
    # The margin does not care about the scale (for two classes its direction is the unscaled cross-entropy's).
    assert margin["pgd_accuracy@0.5"] < ce["pgd_accuracy@0.5"]
    assert margin["pgd_accuracy@0.5"] == pytest.approx(original["pgd_accuracy@0.5"], abs=2 / 64)
    assert margin["attack_loss"] == "margin" and ce["attack_loss"] == "ce"
    with pytest.raises(ValueError, match="attack_loss='hinge' is not one of"):
        RobustnessEvaluator(trained, attack_loss="hinge")


def test_cli_reads_tables_as_the_recipes_do(tmp_path, trained, tokenizer, test_rows):
    """The recipes' flag names and column syntax: a headerless TSV with `--column_names text,label` and
    `--text_column_name` (the old `--text_column` still works); a misspelt flag and a missing column are one line."""
    import subprocess
    import sys

    trained.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tsv = tmp_path / "test.tsv"
    tsv.write_text("".join(f"{r['text']}\t{r['label']}\n" for r in test_rows[:8]))
    common = ["--model_paths", str(tmp_path / "model"), "--attacks", "pgd", "--epsilons", "0.1"]
    common += ["--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")]
    for spelling in (["--text_column_name", "text"], ["--text_column", "text"]):
        report = main([*common, "--dataset", str(tsv), "--column_names", "text,label", *spelling])
        assert report["model"]["num_examples"] == 8
    # Kaggle's IMDB layout (review,sentiment with class names) needs no flag, as in the recipes; the recipes' flag
    # names --test_file and --max_seq_length work too. The scores equal those of the TSV with ids.
    kaggle = tmp_path / "kaggle.csv"
    names = {0: "negative", 1: "positive"}
    pd.DataFrame(
        {"review": [r["text"] for r in test_rows[:8]], "sentiment": [names[r["label"]] for r in test_rows[:8]]}
    ).to_csv(kaggle, index=False)
    named = copy.deepcopy(trained)  # the module's model keeps its own config for the other tests
    named.config.id2label, named.config.label2id = names, {v: k for k, v in names.items()}
    named.save_pretrained(tmp_path / "model")
    by_name = main([*common, "--test_file", str(kaggle), "--max_seq_length", "128"])
    assert by_name["model"]["clean_accuracy"] == report["model"]["clean_accuracy"]
    assert by_name["model"]["pgd_accuracy@0.1"] == report["model"]["pgd_accuracy@0.1"]
    for argv, message in (
        ([*common, "--dataset", str(tsv), "--epsilonss", "0.1"], "did you mean --epsilons"),
        (
            [*common, "--dataset", str(tsv)],
            "no text column; looked for ['text', 'review', 'sentence', 'comment_text']",
        ),
        (
            [*common, "--dataset", str(kaggle), "--label_column_name", "review"],
            "is not a class of this model's 2 labels",
        ),
    ):
        command = [sys.executable, "-m", "hf_adv.robustness", *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["rows.json", "rows.json.bz2", "rows.json.xz", "rows.jsonl.gz", "lines.json"])
def test_read_table_reads_json_arrays_and_lines_compressed_or_not(tmp_path, name):
    import bz2
    import gzip
    import lzma

    from hf_adv.robustness import read_table

    rows = [{"text": "a b", "label": 1}, {"text": "c", "label": 0}]
    text = "\n".join(json.dumps(r) for r in rows) if "lines" in name or "jsonl" in name else json.dumps(rows)
    opener = {".bz2": bz2.open, ".xz": lzma.open, ".gz": gzip.open}.get(Path(name).suffix, open)
    with opener(tmp_path / name, "wt", encoding="utf-8") as handle:
        handle.write("\ufeff" + text if name == "rows.json" else text)  # a byte-order mark too
    assert read_table(str(tmp_path / name)).to_dict("records") == rows


def test_cli_answers_labels_that_do_not_fit_in_one_line(tmp_path, trained, tokenizer, test_rows):
    import subprocess
    import sys

    import pandas as pd

    trained.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    frame = pd.DataFrame(test_rows[:6])
    frame.assign(sentiment=["positive", "negative"] * 3).to_csv(tmp_path / "words.csv", index=False)
    frame.assign(label=5).to_csv(tmp_path / "range.csv", index=False)
    common = ["--model_paths", str(tmp_path / "model"), "--attacks", "pgd", "--disable_tqdm", "true"]
    common += ["--output_dir", str(tmp_path / "out")]
    cases = [
        (["--dataset", str(tmp_path / "words.csv"), "--label_column_name", "sentiment"], "'positive'"),
        (
            ["--dataset", str(tmp_path / "range.csv")],
            "label '5' in column 'label' is not a class of this model's 2 labels",
        ),
        (["--dataset", str(tmp_path / "range.csv"), "--label_column_name", "labelz"], "no label column 'labelz'"),
    ]
    for argv, message in cases:
        command = [sys.executable, "-m", "hf_adv.robustness", *common, *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: ") and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def _labels_read(labels, **kwargs) -> list:
    rows = [{"input_ids": [2, 3], "attention_mask": [1, 1], "label": value} for value in labels]
    return [f["labels"][0].tolist() for f in build_dataloader(rows, batch_size=1, **kwargs)]


def test_labels_are_read_as_the_recipes_read_them():
    """Ids first, then the model's class names (case-insensitive, pos/neg for positive/negative), as the IMDB
    recipe reads them; multi-label cells as lists, lists written to a CSV cell, or comma-separated ids or names."""
    names = {0: "negative", 1: "positive"}
    assert _labels_read(["1", 0, 1.0, " Positive ", "neg", "pos"], id2label=names) == [1, 0, 1, 1, 0, 1]
    # Names that look like ids (star ratings) are ids, as in the recipe: a CSV '1' and a JSON 1 are the same class.
    stars = {0: "1", 1: "2", 2: "3"}
    assert _labels_read(["1", 1], num_labels=3, id2label=stars) == [1, 1]
    multi = {0: "joy", 1: "anger", 2: "sad"}
    kwargs = dict(problem_type="multi_label_classification", num_labels=3, id2label=multi)
    read = _labels_read(["joy, anger", ["sad"], "[0, 2]", "['joy', 'sad']", "1", [1, 0, 1]], **kwargs)
    assert read == [[1, 1, 0], [0, 0, 1], [1, 0, 1], [1, 0, 1], [0, 1, 0], [1, 0, 1]]
    for bad in ("inf", "1e400", "1.5", "meh", "[0,"):
        with pytest.raises(ValueError, match=re.escape(f"label {bad!r} in column 'label' is not a class")):
            _labels_read([bad], id2label=names)


def test_missing_text_names_its_row(tokenizer):
    rows = [{"text": "good film", "label": 1}, {"text": None, "label": 0}]
    with pytest.raises(ValueError, match="Row 2: text column 'text' holds None; expected a non-empty text"):
        build_dataloader(rows, tokenizer)
