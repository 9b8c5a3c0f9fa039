"""Smoke tests of recipes/imdb.py and recipes/multilabel.py on a tiny BERT and a few rows of data.

Most runs call the recipe's `main(argv)` in this process, which is the whole script but its `__main__` guard, so
that every method on both recipes fits in a short test run (importing transformers costs seconds per subprocess).
The `slow` tests run the scripts as users do: `python recipes/...` in a subprocess, and a 2-process CPU launch
with `accelerate launch`.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from hf_adv.cli import UsageError
from hf_adv.methods import get_method_class, list_methods

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(RECIPES))

import common  # noqa: E402
import imdb  # noqa: E402
import multilabel  # noqa: E402
import reference  # noqa: E402  (tests/reference.py: pytest puts tests/ on the path)

WORDS = (
    "the a movie film plot actor acting was is and it good great superb love fun happy joy bad awful boring "
    "hate dull sad anger fear wow end i this so not"
).split()
GOOD = ["good", "great", "superb", "love", "fun"]
BAD = ["bad", "awful", "boring", "hate", "dull"]
EMOTIONS = ["joy", "anger", "sad"]


# Every registered method, with the flags of its first reference case (tests/reference.py) and a start at step 0
# (AWP otherwise waits for epoch 1): registering a method runs it through both recipes with no edit here.
def _recipe_flags(method: str) -> list[str]:
    flags = [f"--{k}={v}" for k, v in reference.first_case(method).flags.items()]
    return flags + (["--adv_start_epoch", "0"] if get_method_class(method).default_start_epoch > 0 else [])


METHODS = {"none": [], **{m: _recipe_flags(m) for m in list_methods(None)}}
# The metric that shows the method ran, in the logged history: the method's first logged metric.
METHOD_METRIC = {m: get_method_class(m).metrics[0] for m in list_methods(None)}


# -- fixtures: a tiny model and a few rows of data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialized 2-layer BERT without a head, like a pretrained checkpoint, and a word-level vocab."""
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(path)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return str(path)


def review(i: int) -> tuple[str, int]:
    label = i % 2
    words = (GOOD if label else BAD)[i % 5 :] + (GOOD if label else BAD)[: i % 5]
    return f"the movie was {words[0]} and {words[1]} <br /><br />the acting is {words[2]}", label


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    rows = [review(i) for i in range(24)]
    pd.DataFrame(
        {
            "id": range(24),
            "rating": [8 if y else 2 for _, y in rows],
            "label": [y for _, y in rows],
            "text": [t for t, _ in rows],
        }
    ).to_csv(path / "imdb.csv", index=False)
    pd.DataFrame(
        {"review": [t for t, _ in rows], "sentiment": ["positive" if y else "negative" for _, y in rows]}
    ).to_csv(path / "kaggle.csv", index=False)
    for split in ("train", "test"):
        for name in ("pos", "neg"):
            (path / "aclImdb" / split / name).mkdir(parents=True)
        for i, (text, label) in enumerate(rows[:12]):
            (path / "aclImdb" / split / ("pos" if label else "neg") / f"{i}_{8 if label else 2}.txt").write_text(text)
    (path / "aclImdb" / "train" / "unsup").mkdir()  # unlabelled reviews: not training rows
    for i in range(6):
        (path / "aclImdb" / "train" / "unsup" / f"{i}_0.txt").write_text(review(i + 30)[0])
    pd.DataFrame({"review": [review(i)[0] for i in range(40, 46)]}).to_csv(path / "unlabelled.csv", index=False)

    # GoEmotions layout: no header, text<TAB>label ids<TAB>id; a quote inside a text must not start a quoted field.
    emotion_rows = []
    for i in range(24):
        ids = sorted({i % 3, (i * 7) % 3} if i % 4 else {i % 3})
        text = " ".join(["i", "so", *[EMOTIONS[j] for j in ids], "wow" if i % 5 else 'the "end']) + " this"
        emotion_rows.append((text, ids, f"c{i}"))
    with open(path / "emotions.tsv", "w") as f:
        for text, ids, key in emotion_rows:
            f.write(f"{text}\t{','.join(map(str, ids))}\t{key}\n")
    (path / "labels.txt").write_text("\n".join(EMOTIONS) + "\n")
    with open(path / "emotions.jsonl", "w") as f:
        for text, ids, key in emotion_rows:
            f.write(json.dumps({"text": text, "labels": [EMOTIONS[j] for j in ids], "id": key}) + "\n")
    columns = pd.DataFrame({"text": [t for t, _, _ in emotion_rows]})
    for j, name in enumerate(EMOTIONS):
        columns[name] = [int(j in ids) for _, ids, _ in emotion_rows]
    columns.to_parquet(path / "emotions_columns.parquet")
    return path


def train_args(model: str, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        model,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_pin_memory",
        "false",
        *extra,
    ]


def logged(output_dir: Path, name: str) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[name] for entry in history if name in entry]


def assert_outputs(output_dir: Path, predict_split: str = "test") -> pd.DataFrame:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "all_results.json"):
        assert (output_dir / name).is_file(), name
    return pd.read_csv(output_dir / f"predictions_{predict_split}.csv")


# -- every method, single-label and multi-label --------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_imdb_every_method(tiny_model, data, tmp_path, method):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv")]
    results = imdb.main(train_args(tiny_model, out, *files, *METHODS[method]))
    assert 0 <= results["test_accuracy"] <= 1 and "test_f1" in results and "eval_accuracy" in results
    if method != "none":
        assert logged(out, METHOD_METRIC[method]), f"{method} never ran"
    predictions = assert_outputs(out)
    assert len(predictions) == 24 and set(predictions["prediction"]) <= {"negative", "positive"}
    assert "<br" not in " ".join(predictions["text"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("method", list(METHODS))
def test_multilabel_every_method(tiny_model, data, tmp_path, method):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(data / "emotions.tsv"), "--validation_file", str(data / "emotions.tsv")),
        *("--test_file", str(data / "emotions.tsv"), "--column_names", "text,labels,id"),
        *("--class_names_file", str(data / "labels.txt")),
    ]
    results = multilabel.main(train_args(tiny_model, out, *files, *METHODS[method]))
    for key in ("test_micro_f1", "test_macro_f1", "test_roc_auc_macro", "test_f1_anger", "decision_threshold"):
        assert key in results, key
    assert results["decision_threshold"] in multilabel.THRESHOLDS
    if method != "none":
        assert logged(out, METHOD_METRIC[method]), f"{method} never ran"
    predictions = assert_outputs(out)
    assert list(predictions.columns[:4]) == ["row", "id", "labels", "predicted"]
    assert predictions.loc[0, "labels"] == "joy" and predictions.loc[0, "id"] == "c0"
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 3


def test_multilabel_pos_weight(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "emotions.jsonl"), "--pos_weight", "auto", "--adv_method", "fgm"]
    results = multilabel.main(train_args(tiny_model, out, *files))
    assert logged(out, "adv_loss") and "eval_micro_f1" in results
    assert_outputs(out, predict_split="validation")
    # names in a list column, inferred and sorted
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "anger", "1": "joy", "2": "sad"}


def test_pos_weight_loss_is_weighted_bce_over_the_accumulated_entries():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_weight = torch.tensor([2.0, 0.5])
    loss = multilabel.pos_weight_loss(pos_weight)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
    torch.testing.assert_close(loss({"logits": logits}, labels), expected)
    # With Trainer's count of the entries of 2 micro-batches, each micro-batch gives half its mean.
    torch.testing.assert_close(loss({"logits": logits}, labels, num_items_in_batch=8), expected / 2)


def test_multilabel_pos_weight_is_used():
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).numpy()
    weights = multilabel.resolve_pos_weight("auto", targets, cap=2.0, class_names=["a", "b"])
    assert weights.tolist() == pytest.approx([1 / 3, 2.0])
    assert multilabel.resolve_pos_weight("3", targets, 10.0, ["a", "b"]).tolist() == [3.0, 3.0]
    with pytest.raises(common.RecipeError, match="one per label"):
        multilabel.resolve_pos_weight("1,2,3", targets, 10.0, ["a", "b"])


# -- data formats --------------------------------------------------------------------------------------------------
def test_imdb_kaggle_csv(tiny_model, data, tmp_path):
    results = imdb.main(train_args(tiny_model, tmp_path / "out", "--train_file", str(data / "kaggle.csv")))
    assert results["eval_samples"] == 2  # 10% of 24 rows held out
    predictions = assert_outputs(tmp_path / "out", predict_split="validation")
    assert set(predictions["label"]) <= {"negative", "positive"}


def test_imdb_aclimdb_folder(tiny_model, data, tmp_path):
    results = imdb.main(train_args(tiny_model, tmp_path / "out", "--data_dir", str(data)))
    assert results["test_samples"] == 12
    predictions = assert_outputs(tmp_path / "out")
    assert predictions["id"].str.fullmatch(r"\d+_\d+").all()


def test_multilabel_indicator_columns(tiny_model, data, tmp_path):
    args = ["--train_file", str(data / "emotions_columns.parquet"), "--label_columns", "joy,anger,sad"]
    results = multilabel.main(train_args(tiny_model, tmp_path / "out", *args))
    assert "eval_tuned_micro_f1" in results


def test_samples_are_drawn_with_the_split_seed(data):
    frame = pd.read_csv(data / "imdb.csv")
    first = common.sample(frame, 10, seed=3)
    assert first.index.tolist() == common.sample(frame, 10, seed=3).index.tolist()
    assert first.index.tolist() != list(range(10))  # a sample, not the first (sorted) rows
    train, validation = common.carve_validation(frame, 25, seed=3)
    assert len(validation) == 6 and not set(train.index) & set(validation.index)


def test_config_file_with_overrides(tiny_model, data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model}\ntrain_file: {data / 'imdb.csv'}\nadv_method: pgd\nadv_steps: 2\n"
        "learning_rate: 5e-5\nmax_steps: 50\nper_device_train_batch_size: 4\nreport_to: none\nsave_strategy: 'no'\n"
    )
    model_args, data_args, training_args = common.parse_arguments(
        (common.ModelArguments, imdb.ImdbDataArguments, imdb.AdversarialTrainingArguments),
        [str(config), "--max_steps", "2", "--output_dir", str(tmp_path / "out")],
    )
    assert (training_args.adv_method, training_args.adv_steps, training_args.max_steps) == ("pgd", 2, 2)
    assert training_args.learning_rate == 5e-5 and data_args.train_file == str(data / "imdb.csv")
    imdb.main(
        [
            str(config),
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
            "--logging_steps",
            "1",
            "--dataloader_pin_memory",
            "false",
        ]
    )
    assert logged(tmp_path / "out", "adv_loss")


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: x\nadv_epsilom: 1.0\n")
    with pytest.raises(UsageError, match=r"unknown keys 'adv_epsilom' \(did you mean adv_epsilon\b"):
        common.parse_arguments(
            (common.ModelArguments, imdb.ImdbDataArguments, imdb.AdversarialTrainingArguments), [str(config)]
        )


@pytest.mark.parametrize("config", sorted(p.name for p in (RECIPES / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config, tmp_path):
    recipe = imdb if config.startswith("imdb") else multilabel
    types = (
        (common.ModelArguments, imdb.ImdbDataArguments, imdb.AdversarialTrainingArguments)
        if recipe is imdb
        else (
            common.ModelArguments,
            multilabel.MultiLabelDataArguments,
            multilabel.LossArguments,
            multilabel.AdversarialTrainingArguments,
        )
    )
    parsed = common.parse_arguments(types, [str(RECIPES / "configs" / config), "--output_dir", str(tmp_path)])
    training_args = parsed[-1]
    # imdb_<method>[_<variant>].yaml configures exactly that method (a perturbation or a regularizer).
    method = config.removesuffix(".yaml").split("_")[1]
    configured = {cls.name for cls, _ in training_args.configured_methods()}
    if method == "distill":  # distillation is not a method: it changes every pass's loss, with a teacher
        # imdb_distill_<method>.yaml combines it with that method (imdb_distill_fgm.yaml); other variants with none.
        variant = config.removesuffix(".yaml").split("_")[2:]
        combined = {variant[0]} & set(list_methods()) if variant else set()
        assert configured == combined and training_args.distill_teacher, configured
        return
    assert configured == (set() if method == "none" else {method}), configured
    if method == "awp":  # AWP must not start on a fresh head, and must get to run
        assert 0 < training_args.resolved_start_epoch < training_args.num_train_epochs


def test_every_registered_method_has_a_config():
    """Each registered method ships `recipes/configs/imdb_<method>.yaml` (so the quality benchmark can train it)."""
    shipped = {p.stem.removeprefix("imdb_") for p in (RECIPES / "configs").glob("imdb_*.yaml")}
    assert set(list_methods(None)) <= shipped, set(list_methods(None)) - shipped


# -- bad input: a clear error before any training ------------------------------------------------------------------
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "recipe, content, name, extra, message",
    [
        ("imdb", "id,review_text,label\n1,good,1\n", "a.csv", [], r"no text column; looked for .*'review_text'"),
        ("imdb", "text,label\ngood,1\n", "a.csv", ["--label_column_name", "stars"], r"no label column 'stars'"),
        ("imdb", "text,label\ngood,1\nbad,positve\n", "a.csv", [], r"a\.csv, row 2 .*unknown label 'positve'"),
        ("imdb", "text,label\ngood,1\nbad,2\n", "a.csv", [], r"row 2 .*label id 2 .*outside the label set"),
        ("imdb", "text,label\ngood,1\n,0\n", "a.csv", [], r"row 2 .*text column 'text' is ''"),
        ("imdb", "", "a.csv", [], r"a\.csv is empty"),
        ("imdb", "text,label\n", "a.csv", [], r"a\.csv has a header but no data rows"),
        ("imdb", "text,label\ngood,1\n", "a.xlsx", [], r"cannot tell the format .*'\.xlsx'"),
        ("imdb", '{"text": "good", "label": 1}\n{"text": \n', "a.jsonl", [], r"could not be read as JSONL"),
        ("multilabel", "good\t0\nbad\t3\n", "a.tsv", ["--column_names", "text,labels"], r"row 2: label id 3 .*0 to 2"),
        ("multilabel", "good\tjoy\nbad\trage\n", "a.tsv", ["--column_names", "text,labels"], r"unknown label 'rage'"),
        ("multilabel", "good\t[0, 1\n", "a.tsv", ["--column_names", "text,labels"], r"not a readable list"),
    ],
)
def test_bad_input_is_reported_before_training(tiny_model, data, tmp_path, recipe, content, name, extra, message):
    path = write(tmp_path / name, content)
    out = tmp_path / "out"
    if recipe == "multilabel":
        extra = [*extra, "--class_names_file", str(data / "labels.txt")]
    with pytest.raises(common.DataError, match=message):
        {"imdb": imdb, "multilabel": multilabel}[recipe].main(
            train_args(tiny_model, out, "--train_file", path, *extra)
        )
    assert not out.exists()  # nothing was written


# -- unlabelled text (semi-supervised VAT) ---------------------------------------------------------------------------
UNLABELED_SOURCES = {
    "csv": lambda data: ["--unlabeled_file", str(data / "unlabelled.csv")],  # text in 'review'
    "folder": lambda data: ["--unlabeled_file", str(data / "aclImdb" / "train" / "unsup")],
    "test-split": lambda data: ["--unlabeled_from_test", "true"],
    "aclImdb-unsup": lambda data: ["--unlabeled_from_unsup", "true"],
}


@pytest.mark.parametrize("source", list(UNLABELED_SOURCES))
def test_imdb_learns_from_unlabelled_text(tiny_model, data, tmp_path, source, capsys):
    out = tmp_path / "out"
    if source == "aclImdb-unsup":
        files = ["--data_dir", str(data / "aclImdb")]
    else:
        files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv")]
    extra = [*UNLABELED_SOURCES[source](data), "--unlabeled_ratio", "2", "--vat_weight", "1.0"]
    results = imdb.main(train_args(tiny_model, out, *files, *extra))
    # 2 steps of 4 labelled rows, each bringing 2 unlabelled ones.
    assert results["train_labeled_rows"] == 8 and results["train_unlabeled_rows"] == 16
    assert logged(out, "unlabeled_rows") == [8, 8] and logged(out, "vat_loss")
    summary = capsys.readouterr().out
    assert "unlabelled  " in summary and "2 per labelled row; seen 8 labelled and 16 unlabelled rows" in summary


def test_unlabelled_file_has_its_own_column_rules(tiny_model, data, tmp_path):
    """The training files' --column_names (headerless GoEmotions TSV) do not apply to an unlabelled CSV with a
    header; a headerless one is described by --unlabeled_column_names, its text column by
    --unlabeled_text_column_name."""
    write(tmp_path / "bodies.csv", "id,body\n1,i so joy wow\n2,anger this\n")
    write(tmp_path / "bare.tsv", "x1\ti so joy\nx2\tsad wow\nx3\tthe end\n")
    base = [
        *("--train_file", str(data / "emotions.tsv"), "--column_names", "text,labels,id"),
        *("--class_names_file", str(data / "labels.txt"), "--vat_weight", "1.0"),
    ]
    header = [*base, "--unlabeled_file", str(tmp_path / "bodies.csv"), "--unlabeled_text_column_name", "body"]
    bare = [*base, "--unlabeled_file", str(tmp_path / "bare.tsv"), "--unlabeled_column_names", "id,text"]
    for extra, texts in ((header, ["i so joy wow", "anger this"]), (bare, ["i so joy", "sad wow", "the end"])):
        data_args = multilabel.parse_arguments(
            (common.ModelArguments, multilabel.MultiLabelDataArguments, imdb.AdversarialTrainingArguments),
            ["--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "o"), *extra],
        )[1]
        raw = {"train": common.read_table(str(data / "emotions.tsv"), ["text", "labels", "id"])}
        assert common.load_unlabeled(data_args, raw, multilabel.TEXT_COLUMNS)["text"].tolist() == texts


def test_multilabel_learns_from_unlabelled_text_with_a_sample(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(data / "emotions.tsv"), "--column_names", "text,labels,id"),
        *("--class_names_file", str(data / "labels.txt"), "--vat_weight", "1.0"),
        *("--unlabeled_file", str(data / "emotions.tsv"), "--max_unlabeled_samples", "5"),
        *("--unlabeled_column_names", "text,labels,id"),
    ]
    results = multilabel.main(train_args(tiny_model, out, *files))
    assert results["train_labeled_rows"] == 8 and results["train_unlabeled_rows"] == 8
    assert logged(out, "vat_loss")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--unlabeled_file", "{data}/unlabelled.csv"], r"--unlabeled_file .* is given, but .*Set vat_weight > 0"),
        (["--vat_weight", "1", "--unlabeled_ratio", "3"], r"--unlabeled_ratio 3 is read only with unlabelled text"),
        (["--vat_weight", "1", "--unlabeled_file", "{data}/nothing.csv"], r"nothing\.csv: no such file or folder"),
        (["--vat_weight", "1", "--unlabeled_file", "{tmp}/empty.csv"], r"empty\.csv has a header but no data rows"),
        (
            ["--vat_weight", "1", "--unlabeled_file", "{tmp}/notext.csv"],
            r"notext\.csv: no text column; looked for .*Set --unlabeled_text_column_name .*--unlabeled_column_names",
        ),
        (["--vat_weight", "1", "--unlabeled_file="], r"--unlabeled_file is empty"),
        (["--vat_weight", "1", "--unlabeled_column_names", "text"], r"describe --unlabeled_file, which is not given"),
        (["--vat_weight", "1", "--unlabeled_file", "{tmp}/blank.csv"], r"blank\.csv, row 2 .*text column 'text'"),
        (["--vat_weight", "1", "--unlabeled_from_unsup", "true"], r"has no unlabelled split .*--unlabeled_file"),
        (["--vat_weight", "1", "--unlabeled_from_test", "true"], r"no test split to take texts from"),
        (["--vat_weight", "1", "--max_unlabeled_samples", "0"], r"--max_unlabeled_samples must be >= 1"),
        (["--vat_weight", "1", "--max_unlabeled_samples", "5"], r"--max_unlabeled_samples 5 is read only with unlab"),
    ],
)
def test_unlabelled_text_is_refused_before_training(tiny_model, data, tmp_path, extra, message):
    write(tmp_path / "empty.csv", "text,label\n")
    write(tmp_path / "notext.csv", "body\nfine\n")
    write(tmp_path / "blank.csv", 'text\ngood\n""\n')
    extra = [arg.format(data=data, tmp=tmp_path) for arg in extra]
    out = tmp_path / "out"
    with pytest.raises(common.RecipeError, match=message):
        imdb.main(train_args(tiny_model, out, "--train_file", str(data / "imdb.csv"), *extra))
    assert not out.exists()


def test_label_smoothing_with_an_attack_trains(tiny_model, data, tmp_path):
    # Trainer pops the labels out of the batch it is given when it smooths them; every pass gets its own copy.
    out = tmp_path / "out"
    args = ["--train_file", str(data / "imdb.csv"), "--adv_method", "fgm", "--label_smoothing_factor", "0.1"]
    imdb.main(train_args(tiny_model, out, *args))
    assert logged(out, "adv_loss")


def test_empty_split_after_filtering_is_reported(tmp_path):
    frame = pd.DataFrame({"text": ["a"], "label": [1]})
    with pytest.raises(common.DataError, match="too few to hold out"):
        common.carve_validation(frame, 10, seed=0)


# -- output_dir: resumed or refused, never overwritten ----------------------------------------------------------------
def test_output_dir_is_resumed_or_refused(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv")]
    imdb.main([*train_args(tiny_model, out, *files), "--save_strategy", "steps", "--save_steps", "2"])
    assert (out / "checkpoint-2").is_dir()
    # A marker in the checkpoint's log history: a resumed run carries it on, a fresh one would not.
    state_path = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][0]["marker"] = 1
    state_path.write_text(json.dumps(state))
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(common.RecipeError, match="already holds checkpoints .*--resume_from_checkpoint true"):
        imdb.main(train_args(tiny_model, out, *files))
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    args = train_args(tiny_model, out, *files, "--max_steps", "4", "--resume_from_checkpoint", "true")
    imdb.main(args)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0].get("marker") == 1 and max(entry["step"] for entry in history) == 4

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(common.RecipeError, match="exists and is not empty"):
        imdb.main(train_args(tiny_model, other, *files))
    assert (other / "notes.txt").read_text() == "mine"


def test_bf16_on_cpu(tiny_model, data, tmp_path):
    # transformers asks for --use_cpu with --bf16 when there is no GPU
    args = ["--train_file", str(data / "imdb.csv"), "--adv_method", "fgm", "--bf16", "true", "--use_cpu", "true"]
    results = imdb.main(train_args(tiny_model, tmp_path / "out", *args))
    assert "eval_accuracy" in results and logged(tmp_path / "out", "adv_loss")
    args = ["--train_file", str(data / "emotions.tsv"), "--column_names", "text,labels,id", "--vat_weight", "1"]
    results = multilabel.main(train_args(tiny_model, tmp_path / "ml", *args, "--bf16", "true", "--use_cpu", "true"))
    assert "eval_tuned_micro_f1" in results and logged(tmp_path / "ml", "vat_loss")


# -- the scripts as users run them ------------------------------------------------------------------------------------
def script_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_script(*command: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    env = {**script_env(), **env}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_imdb_script_with_shipped_config(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        sys.executable,
        "recipes/imdb.py",
        "recipes/configs/imdb_fgm.yaml",
        *train_args(tiny_model, out, "--train_file", str(data / "kaggle.csv")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("imdb: fgm (epsilon 1.0)") == 1
    assert_outputs(out, predict_split="validation")


@pytest.mark.slow
def test_multilabel_script_vat(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(data / "emotions.tsv"), "--column_names", "text,labels,id"),
        *("--class_names_file", str(data / "labels.txt"), "--pos_weight", "2.0"),
    ]
    unlabelled = ["--unlabeled_file", str(data / "emotions.jsonl"), "--unlabeled_ratio", "2"]
    result = run_script(
        sys.executable,
        "recipes/multilabel.py",
        "recipes/configs/goemotions_vat.yaml",
        *train_args(tiny_model, out, *files, *unlabelled),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("multilabel: vat (weight 1.0, epsilon 1.0)") == 1
    assert logged(out, "vat_loss")
    assert "seen 8 labelled and 16 unlabelled rows" in result.stdout


@pytest.mark.slow
def test_script_error_is_one_line(tiny_model, tmp_path):
    path = write(tmp_path / "a.csv", "text,label\ngood,1\nbad,maybe\n")
    result = run_script(
        sys.executable, "recipes/imdb.py", *train_args(tiny_model, tmp_path / "out", "--train_file", path)
    )
    assert result.returncode == 1
    assert "error: " in result.stderr and "unknown label 'maybe'" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What torch warns, on every rank, with DDP's `find_unused_parameters=True` on a model that uses every parameter, and
# with `pin_memory=True` on a machine without an accelerator.
FIND_UNUSED_WARNING = "find_unused_parameters=True was specified in DDP constructor, but did not find any unused"
PIN_MEMORY_WARNING = "'pin_memory' argument is set as true but no accelerator is found"


def without_pin_memory_flag(args: list[str]) -> list[str]:
    at = args.index("--dataloader_pin_memory")
    return args[:at] + args[at + 2 :]


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "explicit-true"])
def test_two_process_cpu_launch(tiny_model, data, tmp_path, explicit):
    """Two processes on CPU: the recipe trains and predicts once; with the defaults, torch warns neither that DDP
    searched for unused parameters in vain nor that memory cannot be pinned, and a user's explicit True still
    gets what was asked (and torch's warnings)."""
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv"), "--adv_method", "fgm"]
    if explicit:
        files += ["--ddp_find_unused_parameters", "true", "--dataloader_pin_memory", "true"]
    result = run_script(
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())),
        "recipes/imdb.py",
        *without_pin_memory_flag(train_args(tiny_model, out, *files)),
        timeout=600,
        ACCELERATE_USE_CPU="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("imdb: fgm (epsilon 1.0)") == 1  # only rank 0 prints the summary
    assert "2 process(es)" in result.stdout
    assert len(assert_outputs(out)) == 24  # predictions gathered from both ranks, without duplicates
    assert logged(out, "adv_loss")
    output = result.stdout + result.stderr
    if torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available():
        pytest.skip("an accelerator is available: memory is pinned by default")
    assert (FIND_UNUSED_WARNING in output) == explicit, output[-3000:]
    assert (PIN_MEMORY_WARNING in output) == explicit, output[-3000:]


@pytest.mark.slow
def test_two_process_launch_with_unlabelled_text(tiny_model, data, tmp_path):
    """Semi-supervised VAT on two processes: each rank's batches carry their own unlabelled rows, and the rows
    seen are counted over both."""
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv"), "--vat_weight", "1"]
    files += ["--unlabeled_file", str(data / "unlabelled.csv"), "--unlabeled_ratio", "2"]
    result = run_script(
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())),
        "recipes/imdb.py",
        *train_args(tiny_model, out, *files),
        timeout=600,
        ACCELERATE_USE_CPU="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    # 2 steps x 2 processes x 4 labelled rows, each bringing 2 unlabelled ones.
    assert "seen 16 labelled and 32 unlabelled rows" in result.stdout, result.stdout[-2000:]
    assert logged(out, "unlabeled_rows") == [16, 16] and logged(out, "vat_loss")


# -- the project's real data, when it is there ------------------------------------------------------------------------
GOEMOTIONS = SHARED_DATA / "goemotions"
IMDB = SHARED_DATA / "imdb"


@pytest.mark.skipif(not (GOEMOTIONS / "train.tsv").is_file(), reason="../shared/data/goemotions is absent")
def test_goemotions_tsv_loads_with_flags_alone(tiny_model, tmp_path):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(GOEMOTIONS / "train.tsv"), "--validation_file", str(GOEMOTIONS / "dev.tsv")),
        *("--test_file", str(GOEMOTIONS / "test.tsv"), "--column_names", "text,labels,id"),
        *("--class_names_file", str(GOEMOTIONS / "labels.txt")),
        *("--max_train_samples", "16", "--max_eval_samples", "32", "--max_predict_samples", "32"),
    ]
    results = multilabel.main(train_args(tiny_model, out, *files))
    assert "test_f1_neutral" in results and results["test_samples"] == 32
    # every row of the three files was read and checked: as many rows as lines, quotes and all
    with open(GOEMOTIONS / "train.tsv", newline="") as f:
        lines = sum(1 for _ in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(common.read_table(str(GOEMOTIONS / "train.tsv"), ["text", "labels", "id"]).frame) == lines


@pytest.mark.slow  # reads and checks all 50,000 reviews
@pytest.mark.skipif(not (IMDB / "train.csv.gz").is_file(), reason="../shared/data/imdb is absent")
def test_imdb_csv_gz_sample_is_balanced(tiny_model, tmp_path):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(IMDB / "train.csv.gz"), "--test_file", str(IMDB / "test.csv.gz")),
        *("--max_train_samples", "16", "--max_eval_samples", "16", "--max_predict_samples", "200"),
        "--max_seq_length",
        "32",
    ]
    imdb.main(train_args(tiny_model, out, *files))
    predictions = assert_outputs(out)
    # the test file is sorted by label: a seeded sample, not its first rows, has both classes
    assert 60 < (predictions["label"] == "positive").sum() < 140


# -- robustness report at the end of training ------------------------------------------------------------------------
ROBUSTNESS_FLAGS = [
    "--robustness_report",
    "true",
    "--robustness_epsilons",
    "0.5",
    "4",
    "--robustness_max_samples",
    "10",
]


def test_imdb_robustness_report(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv"), "--run_name", "fgm"]
    imdb.main(train_args(tiny_model, out, *files, "--adv_method", "fgm", *ROBUSTNESS_FLAGS))
    report = json.loads((out / "robustness.json").read_text())["models"]["fgm"]
    assert report["num_examples"] == 10
    assert report["pgd_accuracy@4"] <= report["pgd_accuracy@0.5"] <= report["clean_accuracy"]
    assert (out / "robustness.md").read_text().startswith("| model") and (out / "robustness.png").is_file()


def test_multilabel_robustness_report(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = [
        *("--train_file", str(data / "emotions.tsv"), "--test_file", str(data / "emotions.tsv")),
        *("--column_names", "text,labels,id", "--class_names_file", str(data / "labels.txt")),
    ]
    multilabel.main(train_args(tiny_model, out, *files, *ROBUSTNESS_FLAGS))
    (name, report), *others = json.loads((out / "robustness.json").read_text())["models"].items()
    assert not others and name.startswith("none") and report["num_examples"] == 10
    assert report["pgd_accuracy@4"] <= report["clean_accuracy"]  # micro-F1 for this multi-label model
    # Named micro-F1 wherever it is shown, not "accuracy".
    assert report["metric"] == "f1_micro"
    table = (out / "robustness.md").read_text()
    assert "clean micro-F1" in table and "accuracy" not in table.lower()


def test_robustness_report_under_both_attack_losses(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv"), "--run_name", "plain"]
    flags = [*ROBUSTNESS_FLAGS, "--robustness_attacks", "pgd", "--robustness_attack_loss", "ce", "margin"]
    imdb.main(train_args(tiny_model, out, *files, *flags))
    report = json.loads((out / "robustness.json").read_text())["models"]
    assert list(report) == ["plain (ce attack)", "plain (margin attack)"]
    assert [r["attack_loss"] for r in report.values()] == ["ce", "margin"]
    assert report["plain (ce attack)"]["clean_accuracy"] == report["plain (margin attack)"]["clean_accuracy"]


def test_imdb_robustness_report_with_chosen_attacks(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", str(data / "imdb.csv"), "--test_file", str(data / "imdb.csv"), "--run_name", "pgd"]
    imdb.main(train_args(tiny_model, out, *files, *ROBUSTNESS_FLAGS, "--robustness_attacks", "pgd"))
    report = json.loads((out / "robustness.json").read_text())["models"]["pgd"]
    assert report["pgd_accuracy@4"] <= report["clean_accuracy"]
    assert not [key for key in report if key.startswith(("fgm_", "min_perturbation", "word_"))]
    assert common.describe_robustness(report).startswith("clean accuracy")


def test_robustness_flags_are_checked(tiny_model, data, tmp_path):
    files = ["--train_file", str(data / "imdb.csv")]
    with pytest.raises(common.RecipeError, match=r"valid names are \['fgm', 'pgd', 'min_perturbation', 'word'\]"):
        imdb.main(train_args(tiny_model, tmp_path / "out", *files, "--robustness_attacks", "pgd", "hotflip"))
    with pytest.raises(common.RecipeError, match=r"--robustness_epsilons must all be > 0, got \[0.5, -1.0\]"):
        imdb.main(train_args(tiny_model, tmp_path / "out", *files, "--robustness_epsilons", "0.5", "-1"))
