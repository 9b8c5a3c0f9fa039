"""AdversarialTrainer under DistributedDataParallel: 2 CPU processes over gloo, launched with torchrun.

One torchrun launch of tests/ddp_worker.py trains every scenario (each method, with gradient accumulation 1 and 2,
with hf_adv's default DDP settings (`find_unused_parameters=False` for these models) and with
`ddp_find_unused_parameters=True`, and with the attack skipped on rank 1 only); one single-process launch trains the
reference of each (same data order, twice the accumulation).
The tests compare the saved results:

* both ranks end with the same weights, equal to the single-process run's;
* the gradients are all-reduced once per optimizer step, as often as with `adv_method="none"`, however many
  backward passes the method runs (a DDP communication hook registered at train begin counts the all-reduces);
* a step whose attack is skipped on one rank only neither hangs nor changes the result.

A second pair of launches (the robust-evaluation scenarios only) runs `evaluate()` with `robust_eval_epsilons` on eval
sets whose size is, or is not, a multiple of WORLD * batch size; the tests check that 2 processes report the
single process's `eval_adv_accuracy@{eps}` and clean metrics, from the same per-example attack results, once each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
WORKER = TESTS / "ddp_worker.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
]

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import ddp_worker  # noqa: E402  (the scenario table only; the worker's patches are installed in its own processes)

from hf_adv import list_methods  # noqa: E402
from hf_adv.methods import get_method_class  # noqa: E402
from hf_adv.robustness import epsilon_key  # noqa: E402

DDP_TIMEOUT = 300  # seconds, for the whole launch; in the worker each collective also times out after 60 s
SINGLE_TIMEOUT = 300
WEIGHT_ATOL = 1e-5
METRICS_COMPARED = (
    "loss",
    "clean_loss",
    "adv_loss",
    "vat_loss",
    "adv_perturbation_norm",
    "adv_skipped",
    "vat_skipped",
    "rdrop_loss",
)
TRAININGS = [n for n, s in ddp_worker.SCENARIOS.items() if not s["skip"]]
ADVERSARIAL = [n for n in TRAININGS if ddp_worker.SCENARIOS[n]["method"] != "none"]
SKIPPED = [n for n, s in ddp_worker.SCENARIOS.items() if s["skip"]]
ROBUST_EVAL = list(ddp_worker.ROBUST_EVAL_SCENARIOS)


@dataclass
class Launch:
    command: list[str]
    timeout: float
    returncode: int | None
    timed_out: bool
    output: str
    scenarios: dict

    def describe(self, lines: int = 40) -> str:
        tail = "\n".join(self.output.splitlines()[-lines:])
        state = f"timed out after {self.timeout} s" if self.timed_out else f"exit code {self.returncode}"
        return f"`{' '.join(self.command)}`: {state}; last output lines:\n{tail}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PET_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _launch(args: list[str], out: Path, timeout: float) -> Launch:
    command = [sys.executable, *args, "--out", str(out)]
    # A session of its own, so that on timeout the launcher and its workers are killed together.
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    scenarios = torch.load(out, weights_only=True)["scenarios"] if out.exists() else {}
    return Launch(command, timeout, proc.returncode, timed_out, output, scenarios)


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> tuple[Launch, Launch]:
    tmp = tmp_path_factory.mktemp("ddp")
    ddp = _launch(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ddp_worker.WORLD), str(WORKER)],
        tmp / "ddp.pt",
        DDP_TIMEOUT,
    )
    single = _launch([str(WORKER), "--single"], tmp / "single.pt", SINGLE_TIMEOUT)
    return ddp, single


def _ranks(launch: Launch, name: str) -> list[dict]:
    if name not in launch.scenarios:
        pytest.fail(f"scenario {name!r} has no result (hang or crash). {launch.describe()}", pytrace=False)
    per_rank = launch.scenarios[name]
    for rank, result in enumerate(per_rank):
        if "error" in result:
            pytest.fail(f"{name!r} failed on rank {rank}:\n{result['error']}", pytrace=False)
    return per_rank


def _reference(single: Launch, name: str) -> dict:
    return _ranks(single, ddp_worker.SCENARIOS[name]["reference"])[0]


def _none_of(name: str) -> str:
    """The `adv_method="none"` scenario with the same accumulation and DDP settings."""
    scenario = ddp_worker.SCENARIOS[name]
    return next(
        n
        for n, s in ddp_worker.SCENARIOS.items()
        if s["method"] == "none" and s["ga"] == scenario["ga"] and s["ddp"] == scenario["ddp"] and not s["skip"]
    )


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_batches_line_up(name: str, per_rank: list[dict], reference: dict) -> None:
    """Micro-batch i of step k on rank r is micro-batch i * WORLD + r of step k in the single run."""
    ga, world = ddp_worker.SCENARIOS[name]["ga"], ddp_worker.WORLD
    assert len(reference["batches"]) == ddp_worker.STEPS * ga * world
    for rank, result in enumerate(per_rank):
        assert len(result["batches"]) == ddp_worker.STEPS * ga
        for j, batch in enumerate(result["batches"]):
            step, i = divmod(j, ga)
            assert batch == reference["batches"][step * ga * world + i * world + rank], (
                f"{name}: rank {rank} micro-batch {j} is not the single run's; the data orders do not line up"
            )


def _assert_matches_reference(name: str, per_rank: list[dict], reference: dict) -> None:
    _assert_batches_line_up(name, per_rank, reference)
    for rank, result in enumerate(per_rank):
        assert result["global_step"] == reference["global_step"] == ddp_worker.STEPS, (name, rank)
    for key, weight in per_rank[0]["weights"].items():
        for rank in range(1, len(per_rank)):
            assert torch.equal(per_rank[rank]["weights"][key], weight), f"{name}: {key} differs on rank {rank}"
    for key, expected in reference["weights"].items():
        torch.testing.assert_close(
            per_rank[0]["weights"][key],
            expected,
            atol=WEIGHT_ATOL,
            rtol=0,
            msg=lambda m, key=key: f"{name}: {key}: {m}",
        )
    # The logged metrics are reduced over ranks, so they equal the single run's means over the same micro-batches.
    assert len(per_rank[0]["logs"]) == len(reference["logs"]) == ddp_worker.STEPS
    for step, (logged, expected) in enumerate(zip(per_rank[0]["logs"], reference["logs"])):
        keys = [k for k in METRICS_COMPARED if k in expected]
        assert sorted(k for k in METRICS_COMPARED if k in logged) == sorted(keys), (name, step)
        for key in keys:
            tolerance = 2e-4 if key == "loss" else 2e-6  # the Trainer rounds the loss to 4 digits, hf_adv to 6
            assert logged[key] == pytest.approx(expected[key], abs=tolerance, rel=1e-5), (name, step, key)


def _configured(method: str) -> list:
    """The method classes a scenario's flags enable."""
    flags = ddp_worker.METHODS[method]
    names = [flags["adv_method"]] if flags.get("adv_method", "none") != "none" else []
    names += [n for n in list_methods("regularizer") if flags.get(get_method_class(n).weight_field, 0) > 0]
    return [get_method_class(n) for n in names]


@pytest.mark.parametrize("name", TRAININGS)
def test_ddp_weights_equal_single_process_accumulation(launches, name):
    ddp, single = launches
    per_rank, reference = _ranks(ddp, name), _reference(single, name)
    _assert_matches_reference(name, per_rank, reference)
    scenario = ddp_worker.SCENARIOS[name]
    if scenario["method"] != "none":
        # The attack ran: the result is not the clean training's, and no attack was skipped.
        none = _ranks(ddp, _none_of(name))[0]
        assert _max_diff(per_rank[0]["weights"], none["weights"]) > 1e-3, f"{name} trained as adv_method='none'"
        for logged in per_rank[0]["logs"]:
            for cls in _configured(scenario["method"]):
                loss = "adv_loss" if cls.kind == "perturbation" else f"{cls.name}_loss"
                assert loss in logged and all(logged.get(m, 0) == 0 for m in cls.summed_metrics), (cls.name, logged)


@pytest.mark.parametrize("name", ADVERSARIAL + SKIPPED)
def test_gradients_all_reduced_once_per_optimizer_step(launches, name):
    ddp, _ = launches
    per_rank = _ranks(ddp, name)
    none = _ranks(ddp, _none_of(name))
    ga = ddp_worker.SCENARIOS[name]["ga"]
    for rank, (result, clean) in enumerate(zip(per_rank, none)):
        assert result["wrapped_at_train_begin"] == "DistributedDataParallel", result["wrapped_at_train_begin"]
        expected = ddp_worker.DDP_FIND_UNUSED[ddp_worker.SCENARIOS[name]["ddp"]]
        assert result["find_unused_parameters"] is expected, (name, rank, result["find_unused_parameters"])
        # Several backward passes per micro-batch ...
        assert clean["backward_calls"] == ddp_worker.STEPS * ga
        if not (rank == 1 and ddp_worker.SCENARIOS[name]["skip"]):
            # (a regularizer alone back-propagates the clean loss with its term: one backward, two graphs)
            assert result["backward_calls"] >= ddp_worker.STEPS * ga, (name, rank, result["backward_calls"])
        # ... and one all-reduce of the whole gradient per optimizer step, as without an attack.
        assert clean["hook_bucket0_calls_per_step"] == [1] * ddp_worker.STEPS
        assert result["hook_bucket0_calls_per_step"] == [1] * ddp_worker.STEPS, (name, rank)
        assert result["hook_calls"] == clean["hook_calls"], (name, rank, result["hook_calls"], clean["hook_calls"])


@pytest.mark.parametrize("name", SKIPPED)
def test_attack_skipped_on_one_rank_does_not_hang(launches, name):
    ddp, single = launches
    # A hang ends in the worker's 60 s collective timeout (or in DDP_TIMEOUT): the scenario then has no result.
    per_rank, reference = _ranks(ddp, name), _reference(single, name)
    # The single run skips the same micro-batches (those standing for rank 1), so the results still agree.
    _assert_matches_reference(name, per_rank, reference)
    scenario = ddp_worker.SCENARIOS[name]
    vat = ddp_worker.METHODS[scenario["method"]].get("vat_weight", 0) > 0
    for logged in per_rank[0]["logs"]:  # totals over both ranks: rank 1 skipped all its micro-batches
        assert logged["adv_skipped"] == (scenario["ga"] if "adv" in scenario["skip"] else 0), logged
        if vat:
            assert logged["vat_skipped"] == (scenario["ga"] if "vat" in scenario["skip"] else 0), logged


def test_launches_completed(launches):
    ddp, single = launches
    for launch in (ddp, single):
        assert not launch.timed_out and launch.returncode == 0, launch.describe()


# -- evaluate() with robust_eval_epsilons -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def robust_eval_launches(tmp_path_factory) -> tuple[Launch, Launch]:
    tmp = tmp_path_factory.mktemp("ddp-robust-eval")
    ddp = _launch(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ddp_worker.WORLD),
            str(WORKER),
            "--scenarios",
            *ROBUST_EVAL,
        ],
        tmp / "ddp.pt",
        DDP_TIMEOUT,
    )
    single = _launch([str(WORKER), "--single", "--scenarios", *ROBUST_EVAL], tmp / "single.pt", SINGLE_TIMEOUT)
    return ddp, single


def _trainer_eval_loss(losses: torch.Tensor, world: int) -> float:
    """`eval_loss` as `Trainer.evaluation_loop` computes it from per-example losses (in eval-set order): each
    process's batch-mean loss repeated once per example of its batch, gathered, and cut to the eval set's size.

    With several processes, accelerate completes the last batches by cycling from the first example, and a padding
    example that shares a batch with a real one enters that batch's mean: then `eval_loss` is not the single
    process's, which is the mean of the per-example losses. That is the Trainer's doing, not hf_adv's.
    """
    n = len(losses)
    pad = (-n) % (world * ddp_worker.BATCH) if world > 1 else 0
    padded = torch.cat([losses, losses[:pad]])
    per_position = torch.cat([batch.mean().repeat(len(batch)) for batch in padded.split(ddp_worker.BATCH)])
    return per_position[:n].mean().item()


def _robust_rows(result: dict, calls: int) -> torch.Tensor:
    """The per-example rows (example, clean then each epsilon, counts) gathered by the one robust evaluation."""
    (gathers,) = result["robust_gathers"]  # once per evaluate(), not in predict()
    assert gathers["gather"], "adversarial_accuracy was not given a gather function"
    assert len(gathers["rows"]) == calls, (len(gathers["rows"]), calls)  # once per batch
    return torch.cat(gathers["rows"])


@pytest.mark.parametrize("name", ROBUST_EVAL)
def test_robust_eval_ddp_equals_single_process(robust_eval_launches, name):
    ddp, single = robust_eval_launches
    per_rank, reference = _ranks(ddp, name), _ranks(single, name)[0]
    n, world, batch = ddp_worker.ROBUST_EVAL_SCENARIOS[name]["eval_size"], ddp_worker.WORLD, ddp_worker.BATCH
    epsilons = sorted(ddp_worker.ROBUST_EVAL_EPSILONS)
    adv_keys = [f"eval_adv_accuracy@{epsilon_key(e)}" for e in epsilons]
    metrics = per_rank[0]["metrics"]
    assert set(adv_keys) <= set(metrics) and set(adv_keys) <= set(reference["metrics"]), sorted(metrics)

    # The same metrics on every rank, equal to the single process's: the accuracies exactly (ratios of counts).
    for rank, result in enumerate(per_rank):
        for key in ("eval_loss", "eval_accuracy", *adv_keys):
            assert result["metrics"][key] == metrics[key], (name, rank, key)
    for key in ("eval_accuracy", *adv_keys):
        assert metrics[key] == reference["metrics"][key], (name, key, metrics[key], reference["metrics"][key])

    # Per example, what the robustness evaluation gathered: each example of the eval set once, in order (the padding
    # examples of the last batches dropped), with the single process's results.
    expected_rows = _robust_rows(reference, calls=-(-n // batch))
    assert expected_rows.shape == (n, 1 + len(epsilons), 3), expected_rows.shape
    for rank, result in enumerate(per_rank):
        rows = _robust_rows(result, calls=-(-n // (world * batch)))
        assert rows.shape == expected_rows.shape, (name, rank, rows.shape)
        assert torch.equal(rows, expected_rows), f"{name}: rank {rank} gathered other per-example results"
    assert expected_rows[:, :, 1].sum(0).tolist() == [n] * (1 + len(epsilons))  # examples counted, per metric

    # A real attack on the right examples: the clean column is a plain prediction's correctness, example by example;
    # an example correct under attack is correct clean and at every smaller epsilon; the largest epsilon fools some.
    labels = reference["labels"]
    for result in (*per_rank, reference):
        assert torch.equal(result["predict_labels"], labels), name  # predict() gathered each example once, in order
        assert result["predict_robust_gathers"] == 0 and not any(
            "adv_accuracy" in k for k in result["predict_metrics"]
        )
    logits = reference["predict_logits"]
    torch.testing.assert_close(per_rank[0]["predict_logits"], logits, atol=1e-6, rtol=0)
    correct = (logits.argmax(-1) == labels).double()
    clean_accuracy = correct.mean().item()
    assert torch.equal(expected_rows[:, 0, 0], correct), name
    assert metrics["eval_accuracy"] == pytest.approx(clean_accuracy, abs=1e-12)
    assert per_rank[0]["predict_metrics"]["test_accuracy"] == pytest.approx(clean_accuracy, abs=1e-12)
    attacked = expected_rows[:, 1:, 0]
    assert (attacked <= expected_rows[:, :1, 0]).all() and (attacked[:, 1:] <= attacked[:, :-1]).all(), name
    for i, key in enumerate(adv_keys):
        assert metrics[key] == pytest.approx(attacked[:, i].mean().item(), abs=1e-12), key
    assert metrics[adv_keys[-1]] < clean_accuracy, (name, metrics[adv_keys[-1]], clean_accuracy)

    # eval_loss: the Trainer's mean of batch means, over the same examples; equal to the single process's whenever
    # no padding example shares a batch with a real one (n a multiple of WORLD * BATCH, or of BATCH only).
    losses = F.cross_entropy(logits, labels, reduction="none")
    assert reference["metrics"]["eval_loss"] == pytest.approx(_trainer_eval_loss(losses, 1), abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(_trainer_eval_loss(losses, world), abs=1e-6)
    if n % batch == 0:
        assert metrics["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], abs=1e-6)


def test_robust_eval_launches_completed(robust_eval_launches):
    ddp, single = robust_eval_launches
    for launch in (ddp, single):
        assert not launch.timed_out and launch.returncode == 0, launch.describe()


# -- find_unused_parameters when the user leaves it unset -------------------------------------------------------------
UNUSED_SCRIPT = """
import sys
import torch
from torch import nn
sys.path.insert(0, {tests!r})
from conftest import leave_process_group, tiny_model
from hf_adv import AdversarialTrainer, AdversarialTrainingArguments

def train(unused, layerdrop=0.0, **flags):
    model = tiny_model()
    model.config.layerdrop = layerdrop
    if unused:
        model.extra = nn.Linear(3, 3)  # a trainable parameter the forward never uses
    g = torch.Generator().manual_seed(0)
    rows = [{{"input_ids": torch.randint(1, 99, (8,), generator=g), "labels": torch.tensor(i % 2)}} for i in range(32)]
    args = AdversarialTrainingArguments(
        output_dir={out!r}, use_cpu=True, report_to="none", per_device_train_batch_size=4, max_steps=3,
        save_strategy="no", adv_method="fgm", disable_tqdm=True, **flags,
    )
    trainer = AdversarialTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    print(f"trained find_unused={{trainer.model_wrapped.find_unused_parameters}}", flush=True)

if sys.argv[1] == "default":
    train(unused=True)
else:
    train(unused=True, ddp_find_unused_parameters=True)
    train(unused=True, layerdrop=0.1)
    leave_process_group()
"""


def _run_unused(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "unused.py"
    script.write_text(UNUSED_SCRIPT.format(tests=str(TESTS), out=str(tmp_path / "out")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run([*command, mode], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=DDP_TIMEOUT)


def test_model_with_unused_parameters_is_told_which_flag_to_set(tmp_path):
    """hf_adv's default (`find_unused_parameters=False`) on a model that leaves a parameter without gradient: DDP
    fails at the next step, and the error names the flag that fixes it."""
    result = _run_unused(tmp_path, "default")
    assert result.returncode != 0
    assert "set ddp_find_unused_parameters=True (--ddp_find_unused_parameters true)" in result.stderr, result.stderr[
        -3000:
    ]


def test_explicit_find_unused_and_layerdrop_keep_the_graph_search(tmp_path):
    """A user's `ddp_find_unused_parameters=True` wins, and a model whose config drops layers keeps the search."""
    result = _run_unused(tmp_path, "kept")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained find_unused=True") == 4, result.stdout  # 2 trainings x 2 ranks


# -- semi-supervised VAT: each epoch's unlabelled rows on every rank --------------------------------------------------
UNLABELLED_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from conftest import leave_process_group, tiny_model
from datasets import Dataset
from hf_adv import AdversarialTrainer, AdversarialTrainingArguments

# Labelled row i has input ids [2, 10 + i, 11, 3], unlabelled row j [2, 40 + j, 3, 0] (same length: no padding).
labelled = Dataset.from_dict({{"input_ids": [[2, 10 + i, 11, 3] for i in range(8)], "labels": [0, 1] * 4}})
unlabelled = Dataset.from_dict({{"input_ids": [[2, 40 + j, 3, 0] for j in range(40)]}})
seen = []

class Spy(AdversarialTrainer):
    def training_step(self, model, inputs, *a, **k):
        ids, labels = inputs["input_ids"], inputs["labels"]
        rows = [int(ids[r, 1]) - 10 for r in range(len(labels)) if labels[r] != -100]
        drawn = sorted(int(ids[r, 1]) - 40 for r in range(len(labels)) if labels[r] == -100)
        epoch = int(self.state.epoch)
        expected = sorted(j for i in rows for j in self.unlabeled_mix.unlabelled_indices(i, epoch))
        assert drawn == expected, (epoch, rows, drawn, expected)
        seen.append((epoch, tuple(drawn)))
        return super().training_step(model, inputs, *a, **k)

args = AdversarialTrainingArguments(
    output_dir={out!r}, use_cpu=True, report_to="none", per_device_train_batch_size=2, num_train_epochs=3,
    save_strategy="no", vat_weight=1.0, unlabeled_ratio=2, disable_tqdm=True,
)
trainer = Spy(model=tiny_model(), args=args, train_dataset=labelled, unlabeled_dataset=unlabelled)
metrics = trainer.train().metrics
epochs = {{e: sorted(j for ep, drawn in seen if ep == e for j in drawn) for e in range(3)}}
assert epochs[0] != epochs[1] != epochs[2], epochs
assert metrics["train_labeled_rows"] == 24 and metrics["train_unlabeled_rows"] == 48, metrics
print(f"checked {{len(seen)}} steps", flush=True)  # one write: the ranks share stdout
leave_process_group()
"""


def test_every_rank_draws_each_epochs_unlabelled_rows(tmp_path):
    """Under DDP the sampler has its own `set_epoch`, so Accelerate does not tell the dataset which epoch it is: the
    trainer does, and each rank's batches carry the rows its labelled rows draw in that epoch, new every epoch."""
    script = tmp_path / "unlabelled.py"
    script.write_text(UNLABELLED_SCRIPT.format(tests=str(TESTS), out=str(tmp_path / "out")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=DDP_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checked 6 steps") == 2, result.stdout  # 3 epochs x 2 steps, on each rank
