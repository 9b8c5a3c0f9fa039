"""Every ```python block of README.md runs as pasted, each in a fresh Python process, with no Hub access.

Where a snippet names a model on the Hub (or on Kaggle, or the folder a README command writes), SUBSTITUTIONS swaps
that string literal for a tiny local model saved here with `save_pretrained`; no snippet is skipped. Lines that
cannot run here are listed in UNRUNNABLE_LINES with the reason, and are the only lines taken out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORDS = (
    "a the film moving wonderful dull and far too long its score is by young composer opens on quiet street".split()
)

# String literal in a snippet -> what the test passes instead (a key of `local_models`, or a file it writes).
SUBSTITUTIONS = {
    '"bert-base-uncased"': "bert",  # a Hub model: a 2-layer BERT with a word-level vocabulary
    '"gpt2"': "gpt2",  # a Hub model: a 2-layer GPT-2 with a word-level vocabulary
    '"/kaggle/input/deberta-v3-base/"': "bert",  # a Kaggle input folder
    '"/kaggle/input/imdb-dataset-of-50k-movie-reviews/IMDB Dataset.csv"': "imdb_csv",  # a Kaggle input file
    '"runs/imdb_fgm"': "bert",  # the folder the README's `recipes/imdb.py ... --output_dir runs/imdb_fgm` writes
}
# Lines taken out of a snippet before it runs -> why they cannot run here.
UNRUNNABLE_LINES = {
    "!pip install --no-deps /kaggle/input/hf-adv/hf_adv-0.1.0-py3-none-any.whl": (
        "an IPython shell escape (not Python), installing a wheel that exists on Kaggle only; hf_adv is importable "
        "here from the checkout"
    ),
}


def python_blocks() -> list[tuple[str, str]]:
    """(the heading the block is under, its code) for every ```python block of the README."""
    blocks, heading = [], "top"
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((heading, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


def block_id(index: int) -> str:
    heading = BLOCKS[index][0]
    return f"{index}-" + re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]


def test_substitutions_and_unrunnable_lines_are_all_used():
    """The tables name what the README holds: a stale entry would hide a snippet that changed."""
    code = "\n".join(block for _, block in BLOCKS)
    assert BLOCKS, "README.md has no ```python block"
    for literal in SUBSTITUTIONS:
        assert literal in code, f"SUBSTITUTIONS: {literal} is in no README snippet"
    for line in UNRUNNABLE_LINES:
        assert line in map(code_of, code.splitlines()), f"UNRUNNABLE_LINES: {line!r} is in no README snippet"


@pytest.fixture(scope="module")
def local_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readme_models")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    BertForSequenceClassification(config).save_pretrained(bert)

    gpt2 = root / "gpt2"
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}, "<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    tokenizer.save_pretrained(gpt2)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(WORDS) + 3, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    ).save_pretrained(gpt2)

    imdb_csv = root / "imdb.csv"
    rows = [f'"{text}",{sentiment}' for text, sentiment in [("a moving, wonderful film", "positive")] * 4]
    rows += [f'"{text}",{sentiment}' for text, sentiment in [("dull, and far too long", "negative")] * 4]
    imdb_csv.write_text("review,sentiment\n" + "\n".join(rows) + "\n")
    return {"bert": bert, "gpt2": gpt2, "imdb_csv": imdb_csv}


def code_of(line: str) -> str:
    """The line without its comment and surrounding blanks."""
    return line.split("#")[0].strip()


def runnable(code: str, local_models: dict[str, Path]) -> str:
    lines = []
    for line in code.splitlines():
        if code_of(line) in UNRUNNABLE_LINES:
            continue
        assert not line.lstrip().startswith(("!", "%")), f"a notebook line not in UNRUNNABLE_LINES: {line!r}"
        lines.append(line)
    code = "\n".join(lines)
    for literal, key in SUBSTITUTIONS.items():
        code = code.replace(literal, repr(str(local_models[key])))
    return code


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=block_id)
def test_readme_snippet_runs(index, local_models, tmp_path):
    code = runnable(BLOCKS[index][1], local_models)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README snippet under {BLOCKS[index][0]!r} failed:\n{result.stderr[-4000:]}"
