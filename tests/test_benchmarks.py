"""The benchmark scripts stay runnable: each runs once on a tiny model for a couple of rounds (no timing checks)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m` does not put the repository root on the path
    sys.path.insert(0, str(ROOT))

from test_recipes import data, tiny_model  # noqa: E402, F401  (module fixtures: a tiny BERT folder, a few rows)

from benchmarks import (  # noqa: E402
    end_to_end,
    fraction_gradients,
    quality,
    report,
    semi_supervised,
    step_cost,
    vat_probe,
)
from benchmarks.common import METHODS, same_checkout_paths  # noqa: E402

# One thread: on a shared 2-core machine OpenMP barriers between busy cores make tiny ops take milliseconds.
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_step_cost_runs_every_method_and_writes_the_report(tmp_path):
    # The memory subprocess costs an interpreter start and imports: run it for plain only.
    result = step_cost.main(
        [*TINY, "--rounds", "2", "--warmup", "1", "--memory-methods", "plain", "--output-dir", str(tmp_path)]
    )
    assert set(result["methods"]) == set(METHODS)
    for method in result["methods"].values():
        assert method["seconds"]["n"] == 2 and method["ratio"]["median"] > 0
    memory = result["methods"]["plain"]["memory"]
    assert memory["tensor_peak_mb"] > 0 and memory["extra_tensor_mb"] == 0
    assert "vs_classic" in result["methods"]["pgd"]["check"]
    saved = json.loads((tmp_path / "benchmarks" / "step_cost.json").read_text())
    assert saved["config"]["model"] == "tiny"
    page = (tmp_path / "benchmarks.md").read_text()
    assert "Cost of one training step" in page and "classic PGD" in page and "Targets" in page


def test_peak_tensor_bytes_counts_live_tensors():
    def clone_twice():
        x = torch.ones(256, 1024)  # 1 MiB
        y = x.clone()
        del x, y

    peak, final = step_cost.peak_tensor_bytes(clone_twice)
    assert peak >= 2 * 2**20 and final == 0


def test_end_to_end_trains_each_method(tmp_path):
    result = end_to_end.main([*TINY, "--steps", "2", "--rounds", "1", "--output-dir", str(tmp_path)])
    assert set(result["methods"]) == set(METHODS)
    assert all(r["seconds"]["median"] > 0 for r in result["methods"].values())
    assert "End to end" in report.render(tmp_path).read_text()


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        step_cost.main([*TINY, "--methods", "fgm,nope", "--output-dir", str(tmp_path)])


# -- quality: recipes trained in subprocesses, scored by hf_adv.robustness --------------------------------------------


def quality_data(rows: Path, root: Path) -> Path:
    """The tiny rows in the layout of ../shared/data."""
    (root / "imdb").mkdir(parents=True)
    (root / "goemotions").mkdir()
    for split in ("train", "test"):
        (root / "imdb" / f"{split}.csv.gz").write_bytes(gzip.compress((rows / "imdb.csv").read_bytes()))
    for split in ("train", "dev", "test"):
        (root / "goemotions" / f"{split}.tsv").write_text((rows / "emotions.tsv").read_text())
    (root / "goemotions" / "labels.txt").write_text((rows / "labels.txt").read_text())
    return root


def test_method_flags_come_from_the_imdb_configs():
    assert quality.method_flags("none", 1.0) == ["--adv_method", "none"]
    pgd = quality.method_flags("pgd", 1.0)
    assert pgd[:2] == ["--adv_method", "pgd"] and "--adv_steps" in pgd
    awp = quality.method_flags("awp", 1.0)
    assert awp[-2:] == ["--adv_start_epoch", "0.5"] and awp.count("--adv_start_epoch") == 1
    assert "--vat_weight" in quality.method_flags("vat", 1.0)


def test_quality_refuses_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match=r"--methods: unknown or no values \['fgn'\]"):
        quality.main(["--methods", "fgm,fgn", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds: comma-separated integers, got ','"):
        quality.main(["--seeds", ",", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--epsilons must all be > 0, got \[0.1, 0.0\]"):
        quality.main(["--epsilons", "0.1", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="missing data files"):
        quality.main(["--tasks", "imdb", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_quality_trains_scores_and_resumes(tiny_model, data, tmp_path):  # noqa: F811
    common = [
        *("--model", tiny_model, "--data-dir", str(quality_data(data, tmp_path / "data"))),
        *("--runs-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "docs")),
        *("--imdb-train-samples", "16", "--goemotions-train-samples", "16", "--eval-samples", "4"),
        *("--test-samples", "8", "--epsilons", "0.5", "4", "--pgd-steps", "2"),
        *("--recipe-args", "--max_steps 2 --per_device_train_batch_size 4 --per_device_eval_batch_size 8"),
    ]
    first = quality.main([*common, "--tasks", "imdb", "--methods", "fgm", "--seeds", "0,1"])
    imdb = first["results"]["imdb"]["fgm"]
    assert imdb["seeds"] == [0, 1] and imdb["clean"]["n"] == 2 and imdb["clean"]["std"] is not None
    for run in first["runs"]:
        assert run["num_examples"] == 8
        assert run["pgd"]["4"] <= run["pgd"]["0.5"] <= run["clean"]
        assert "adversarial: fgm" in (Path(run["run_dir"]).parent / f"seed{run['seed']}.log").read_text()
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "Quality: clean and under attack" in page and "| IMDB (accuracy) | fgm |" in page
    # A page with only the quality table says which flags every run had, and points elsewhere for the step costs.
    assert "extra recipe flags `--max_steps 2 --per_device_train_batch_size 4" in page
    assert "in docs/benchmarks.md, not here" in page and "step-cost section above" not in page
    assert "classic.py" not in page and "AWP perturbs" not in page
    assert (tmp_path / "docs" / "benchmarks" / "quality.png").is_file()

    # A second grid trains only the new run (GoEmotions, multi-label) and reuses the scored one.
    model = tmp_path / "runs" / "imdb" / "fgm" / "seed0" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    second = quality.main([*common, "--tasks", "imdb,goemotions", "--methods", "fgm", "--seeds", "0"])
    assert model.stat().st_mtime_ns == stamp
    assert second["results"]["imdb"]["fgm"]["clean"]["values"] == imdb["clean"]["values"][:1]
    goemotions = second["runs"][1]
    assert goemotions["metric"] == "f1_micro" and goemotions["pgd"]["4"] <= goemotions["clean"]
    saved = json.loads((tmp_path / "docs" / "benchmarks" / "quality.json").read_text())
    assert saved["config"]["seeds"] == [0] and len(saved["runs"]) == 2
    assert not list((tmp_path / "runs").glob("*/*/*.partial"))
    recorded = json.loads((model.parent / "quality_train.json").read_text())["command"]
    assert "<run>" in recorded and "--adv_method" in recorded

    # The same runs through another spelling of --runs-dir (a link): reused, neither trained nor scored again.
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    scored = (model.parent / "quality.json").stat().st_mtime_ns
    relinked = [*common, "--runs-dir", str(tmp_path / "link"), "--tasks", "imdb", "--methods", "fgm", "--seeds", "0"]
    assert quality.main(relinked)["runs"][0]["clean"] == imdb["clean"]["values"][0]
    assert (model.parent / "quality.json").stat().st_mtime_ns == scored and model.stat().st_mtime_ns == stamp

    # --no-train: the grid's trained runs only, the untrained one listed as missing and left untouched.
    partial = quality.main([*common, "--tasks", "imdb", "--methods", "fgm,vat", "--seeds", "0", "--no-train"])
    assert [(r["method"], r["seed"]) for r in partial["runs"]] == [("fgm", 0)]
    assert partial["missing"] == [{"task": "imdb", "method": "vat", "seed": 0}]
    assert not (tmp_path / "runs" / "imdb" / "vat").exists() and model.stat().st_mtime_ns == stamp
    assert (
        "Not trained yet, so not in the table (1 of the grid, `--no-train`): imdb vat seed 0."
        in (tmp_path / "docs" / "benchmarks.md").read_text()
    )
    with pytest.raises(SystemExit, match="no run of the grid is trained yet"):
        quality.main([*common, "--tasks", "imdb", "--methods", "vat", "--seeds", "0", "--no-train"])

    # Other training settings for a run already trained: refused, not silently reused.
    changed = [*common, "--tasks", "imdb", "--methods", "fgm", "--seeds", "0", "--imdb-train-samples", "12"]
    with pytest.raises(SystemExit, match=r"was trained with other settings .*'12'.*'16'"):
        quality.main(changed)
    assert model.stat().st_mtime_ns == stamp


def test_a_run_scored_with_more_attacks_is_reused():
    base = ["--model_paths", "run", "--attacks", "pgd", "--epsilons", "0.1", "--output_dir", "out"]
    more = ["--model_paths", "run", "--attacks", "fgm", "pgd", "word", "--epsilons", "0.1", "--output_dir", "out"]
    assert quality.same_scoring(more, base) and quality.same_scoring(base, base)
    assert not quality.same_scoring(base, more)  # fewer attacks than asked
    assert not quality.same_scoring(more, [*base[:-3], "0.2", *base[-2:]])  # another epsilon
    assert quality.same_scoring([*more, "--disable_tqdm", "true"], base)


# -- semi-supervised VAT: the recipes with unlabelled text ----------------------------------------------------------
@pytest.mark.slow
def test_semi_supervised_trains_every_condition_and_resumes(tiny_model, data, tmp_path):  # noqa: F811
    common = [
        *("--model", tiny_model, "--data-dir", str(quality_data(data, tmp_path / "data"))),
        *("--runs-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "docs"), "--seeds", "0"),
        *("--unlabeled", "8", "--validation-samples", "4", "--test-samples", "8", "--ratio", "2", "--steps", "1"),
        *("--recipe-args", "--per_device_train_batch_size 4 --per_device_eval_batch_size 8"),
    ]
    first = semi_supervised.main([*common, "--tasks", "imdb", "--labels", "4"])
    assert not first["missing"] and len(first["runs"]) == 4
    by_condition = {r["condition"]: r for r in first["runs"]}
    # One step's worth of 16 labelled rows: 4 epochs of 4 rows, each bringing 2 unlabelled ones.
    assert by_condition["plain"]["epochs"] == 4 and by_condition["vat"]["unlabeled_rows"] is None
    assert by_condition["vat_unlabeled"]["unlabeled_rows"] == 32 and by_condition["vat_test"]["unlabeled_rows"] == 32
    page = (tmp_path / "docs" / "benchmarks" / "semi_supervised.md").read_text()
    assert "| imdb | 4 | vat_unlabeled | 0 | accuracy " in page and "| 32 |" in page
    assert "## Semi-supervised VAT" in (tmp_path / "docs" / "benchmarks.md").read_text()

    # A larger labelled set (the learning curve) adds runs; multi-label with the test texts as unlabelled text.
    second = semi_supervised.main([*common, "--tasks", "imdb", "--labels", "4,8", "--conditions", "plain"])
    assert [r["labels"] for r in second["runs"]] == [4, 8]
    folder = tmp_path / "runs" / "imdb" / "data_v4_u8"
    small, large = (set(pd.read_csv(folder / f"labelled_{n}.csv")["id"]) for n in (4, 8))
    assert small < large and not large & set(pd.read_csv(folder / "validation.csv")["id"])
    assert list(pd.read_csv(folder / "unlabeled.csv").columns) == ["text"]  # the labels are dropped
    goemotions = semi_supervised.main([*common, "--tasks", "goemotions", "--labels", "4", "--conditions", "vat_test"])
    assert goemotions["runs"][0]["also"] is not None and goemotions["runs"][0]["unlabeled_rows"] == 32

    # Published again without training; another setting is refused rather than mixed in.
    again = semi_supervised.main([*common, "--tasks", "imdb", "--labels", "4", "--no-train", "--cost-rounds", "1"])
    assert len(again["runs"]) == 4
    cost = again["cost"]
    assert cost["rows"] == {"plain": 16, "vat": 16, "vat_unlabeled": 48} and cost["ratio_to_plain"]["vat"]["n"] == 1
    assert "Cost of a labelled epoch" in (tmp_path / "docs" / "benchmarks" / "semi_supervised.md").read_text()
    # Without --labels, publishing finds every size trained, per task; the per-task form names them likewise.
    everything = semi_supervised.main([*common, "--tasks", "imdb,goemotions", "--conditions", "plain", "--no-train"])
    assert [(r["task"], r["labels"]) for r in everything["runs"]] == [("imdb", 4), ("imdb", 8)]
    assert everything["missing"] == ["goemotions 4 plain seed 0"]
    per_task = [*common, "--tasks", "imdb,goemotions", "--conditions", "vat_test", "--no-train"]
    named = semi_supervised.main([*per_task, "--labels", "imdb=4;goemotions=4"])
    assert [(r["task"], r["labels"]) for r in named["runs"]] == [("imdb", 4), ("goemotions", 4)]
    with pytest.raises(SystemExit, match="task=N,M"):
        semi_supervised.main([*per_task, "--labels", "imbd=4"])
    changed = [*common[:-2], "--recipe-args", "--learning_rate 1e-3", "--tasks", "imdb", "--labels", "4"]
    with pytest.raises(SystemExit, match="trained with other settings"):
        semi_supervised.main(changed)


def test_runs_trained_from_another_checkout_are_the_same_run():
    """A run trained from a git worktree of the project has its recipe and config under that worktree: the same."""
    ours = [str(ROOT / "recipes" / "imdb.py"), str(ROOT / "recipes" / "configs" / "imdb_fgm.yaml"), "--seed", "0"]
    other = ["/elsewhere/wt/recipes/imdb.py", "/elsewhere/wt/recipes/configs/imdb_fgm.yaml", "--seed", "0"]
    assert same_checkout_paths(ours) == same_checkout_paths(other)
    changed = ["/elsewhere/wt/recipes/imdb.py", "/elsewhere/wt/recipes/configs/imdb_pgd.yaml", "--seed", "0"]
    assert same_checkout_paths(ours) != same_checkout_paths(changed)
    files = ["--train_file", "/a/imdb/train.csv.gz"]
    assert same_checkout_paths(files) == files  # data files are compared as they are


def test_distillation_configs_name_their_teacher_run(tmp_path, monkeypatch):
    """`distill_teacher: runs/imdb_<config>` makes the grid train that config's run of the same seed first."""
    assert quality.teacher_method("distill") == "none" and quality.teacher_method("fgm") is None
    args = type("Args", (), {"runs_dir": tmp_path})()
    assert quality.teacher_dir("imdb", 2, args, "distill") == tmp_path / "imdb" / "none" / "seed2"
    flags = quality.method_flags("distill", 1.0, quality.teacher_dir("imdb", 2, args, "distill"))
    assert flags[flags.index("--distill_teacher") + 1] == str(tmp_path / "imdb" / "none" / "seed2")
    settings = {"distill_teacher": "runs/imdb_nothing", "distill_temperature": 20.0}
    monkeypatch.setattr(quality, "config_settings", lambda name: settings)
    with pytest.raises(SystemExit, match="names no config of the grid"):
        quality.teacher_method("anything")


def test_fraction_gradients_measures_each_draw(tiny_model, data, tmp_path):  # noqa: F811
    root = quality_data(data, tmp_path / "data")
    result = fraction_gradients.main(
        [
            *("--model", tiny_model, "--data-dir", str(root), "--output-dir", str(tmp_path / "docs")),
            *("--batches", "1", "--batch-size", "4", "--fraction", "0.5", "--draws", "2", "--max-length", "16"),
        ]
    )
    assert result["rows"] == {"all": 4, "fraction": 2}
    norms, cosines = result["gradient_norm"], result["cosine_with_clean"]
    assert len(norms["clean"]["values"]) == 1 and len(norms["adversarial_fraction"]["values"]) == 2
    assert all(v > 0 for entry in norms.values() for v in entry["values"])
    assert all(-1 <= v <= 1 for entry in cosines.values() for v in entry["values"])
    saved = json.loads((tmp_path / "docs" / "benchmarks" / "fraction_gradients.json").read_text())
    assert saved["command"].startswith("python -m benchmarks.fraction_gradients --model")


def test_vat_probe_compares_every_probe_size_and_iteration_count(tiny_model, data, tmp_path):  # noqa: F811
    root = quality_data(data, tmp_path / "data")
    result = vat_probe.main(
        [
            *("--model", tiny_model, "--data-dir", str(root), "--output-dir", str(tmp_path / "docs")),
            *("--examples", "4", "--xis", "0.1", "10", "--iterations", "1", "2", "--max-length", "16"),
        ]
    )
    rows = {(r["xi"], r["iterations"]): r for r in result["results"]}
    assert sorted(rows) == [(0.1, 1), (0.1, 2), (10.0, 1), (10.0, 2)]
    assert result["reference"] == {"xi": 0.1, "iterations": 2}
    assert all(r["lds"] >= 0 and len(r["cosine"]) == 4 for r in rows.values())
    assert all(abs(c - 1) < 1e-5 for c in rows[(0.1, 2)]["cosine"])  # the reference against itself
    norms = result["embedding_norms"]["imdb"]
    assert norms["examples"] > 0 and 0 < norms["p05"] <= norms["median"] <= norms["p95"]
    saved = json.loads((tmp_path / "docs" / "benchmarks" / "vat_probe.json").read_text())
    assert saved["command"].startswith("python -m benchmarks.vat_probe --model")
