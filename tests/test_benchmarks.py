"""The benchmark scripts stay runnable: each runs once on a tiny model for a couple of rounds (no timing checks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m` does not put the repository root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import end_to_end, report, step_cost  # noqa: E402
from benchmarks.common import METHODS  # noqa: E402

# One thread: on a shared 2-core machine OpenMP barriers between busy cores make tiny ops take milliseconds.
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_step_cost_runs_every_method_and_writes_the_report(tmp_path):
    # The memory subprocess costs an interpreter start and imports: run it for plain only.
    data = step_cost.main(
        [*TINY, "--rounds", "2", "--warmup", "1", "--memory-methods", "plain", "--output-dir", str(tmp_path)]
    )
    assert set(data["methods"]) == set(METHODS)
    for result in data["methods"].values():
        assert result["seconds"]["n"] == 2 and result["ratio"]["median"] > 0
    memory = data["methods"]["plain"]["memory"]
    assert memory["tensor_peak_mb"] > 0 and memory["extra_tensor_mb"] == 0
    assert "vs_classic" in data["methods"]["pgd"]["check"]
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
    data = end_to_end.main([*TINY, "--steps", "2", "--rounds", "1", "--output-dir", str(tmp_path)])
    assert set(data["methods"]) == set(METHODS)
    assert all(r["seconds"]["median"] > 0 for r in data["methods"].values())
    assert "End to end" in report.render(tmp_path).read_text()


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        step_cost.main([*TINY, "--methods", "fgm,nope", "--output-dir", str(tmp_path)])
