"""`RobustnessEvaluator`: the attacks of this package over a data set, with their metrics."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..embedding import EmbeddingTap, find_input_embedding, unwrap_model
from ..losses import MULTI_LABEL, SINGLE_LABEL, infer_problem_type
from .core import ATTACK_LOSSES, ModelOnBatch, epsilon_key
from .embedding_attacks import EmbeddingAttacks
from .word import WordSubstitution

ATTACKS = ("fgm", "pgd", "min_perturbation", "word")


def check_attack_settings(
    attacks: Sequence[str],
    epsilons: Sequence[float],
    attack_losses: Sequence[str],
    num_examples: int | None,
    flags: dict[str, str],
) -> None:
    """Refuse attack settings the evaluation cannot run, naming the flag as the caller spells it (`flags` maps
    `attacks`, `epsilons`, `attack_loss` and `num_examples` to the flag names): the robustness CLI and the recipes'
    `--robustness_*` flags share these rules.

    Raises:
        `ValueError`: for no or unknown attacks or attack losses, a radius that is not > 0, or fewer than one
            example.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"{flags['attacks']}: unknown or no attacks {unknown}; valid names are {list(ATTACKS)}.")
    if not attack_losses or set(attack_losses) - set(ATTACK_LOSSES):
        raise ValueError(f"{flags['attack_loss']}: {list(attack_losses)} must be values of {list(ATTACK_LOSSES)}.")
    if any(not epsilon > 0 for epsilon in epsilons):
        raise ValueError(f"{flags['epsilons']} must all be > 0, got {list(epsilons)}.")
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"{flags['num_examples']} must be >= 1, got {num_examples}.")


# The parts of the evaluation, as the progress bar names the one under way.
ATTACK_LABELS = {
    "clean": "clean pass",
    "fgm_pgd": "FGM/PGD",
    "min_perturbation": "minimal perturbation",
    "word": "word attack",
}


class RobustnessEvaluator(ModelOnBatch, EmbeddingAttacks, WordSubstitution):
    """Attacks a sequence classifier in embedding space and in token space; see the module docstring.

    The per-batch methods (`pgd`, `prediction_flips`, `minimal_perturbation`, `word_attack`) take a batch dict as
    the model takes it, with `labels`; `evaluate(batches)` runs the configured attacks over a data loader and
    returns the metrics. Examples labelled -100 (all -100 for multi-label) are left out.

    Args:
        model (`nn.Module`): a sequence-classification model (single-label or multi-label); DDP, `torch.compile` and
            PEFT wrappers are looked through.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): needed by the word attack only, to tell special tokens
            and subword fragments from words.
        epsilons (`Sequence[float]`, *optional*, defaults to `(0.1, 0.25, 0.5)`): L2 radii per example for FGM/PGD,
            in units of the embedding output (a BERT-family token embedding has a norm of about 1; `evaluate` reports
            the mean norm of a whole example as `embedding_norm_mean`).
        attacks (`Sequence[str]`, *optional*, defaults to all): any of `"fgm"`, `"pgd"`, `"min_perturbation"`,
            `"word"`.
        pgd_steps (`int`, *optional*, defaults to `5`): K, the PGD iterates (the first one is the FGM point).
        pgd_step_size (`float`, *optional*): step of the iterates after the first, as a fraction of epsilon;
            defaults to 2.5 / K (Madry et al.).
        max_epsilon (`float`, *optional*, defaults to `4.0`): upper end of the bisection for the minimal
            perturbation; examples PGD cannot flip at it are reported as unflipped.
        bisection_steps (`int`, *optional*, defaults to `8`): halvings of [0, max_epsilon]: the minimal
            perturbation is found to within max_epsilon / 2**bisection_steps.
        word_budget (`float`, *optional*, defaults to `0.1`): tokens the word attack may change per example: a
            fraction of its tokens when below 1 (at least one token), a number of tokens when 1 or more.
        word_neighbours (`int`, *optional*, defaults to `20`): candidates per token, nearest by cosine similarity
            in the input embedding.
        embedding_name (`str`, *optional*): the embedding weight to attack; see `find_input_embedding`.
        attack_loss (`str`, *optional*, defaults to `"ce"`): what the embedding and word attacks maximize: `"ce"`,
            the model's own loss (cross-entropy, or BCE for multi-label), or `"margin"`, the logit difference of
            Carlini and Wagner (`margin_loss`), which a saturated softmax (defensive distillation) does not hide.
        seed (`int`, *optional*, defaults to `0`): seeds torch inside `evaluate`, whose caller's random state is
            restored afterwards (the attacks themselves are deterministic).
        disable_tqdm (`bool`, *optional*, defaults to `False`): hide the progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        epsilons: Sequence[float] = (0.1, 0.25, 0.5),
        attacks: Sequence[str] = ATTACKS,
        pgd_steps: int = 5,
        pgd_step_size: float | None = None,
        max_epsilon: float = 4.0,
        bisection_steps: int = 8,
        word_budget: float = 0.1,
        word_neighbours: int = 20,
        embedding_name: str | None = None,
        attack_loss: str = "ce",
        seed: int = 0,
        disable_tqdm: bool = False,
    ):
        unknown = sorted(set(attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"Unknown attacks {unknown}; valid names are {list(ATTACKS)}.")
        if any(not e > 0 for e in epsilons):
            raise ValueError(f"epsilons must be > 0, got {list(epsilons)}.")
        if not (isinstance(pgd_steps, int) and pgd_steps >= 1):
            raise ValueError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}.")
        if pgd_step_size is not None and not pgd_step_size > 0:
            raise ValueError(f"pgd_step_size must be > 0, got {pgd_step_size}.")
        if not max_epsilon > 0 or bisection_steps < 0:
            raise ValueError(f"need max_epsilon > 0 and bisection_steps >= 0, got {max_epsilon}, {bisection_steps}.")
        if not word_budget > 0 or word_neighbours < 1:
            raise ValueError(f"need word_budget > 0 and word_neighbours >= 1, got {word_budget}, {word_neighbours}.")
        if attack_loss not in ATTACK_LOSSES:
            raise ValueError(f"attack_loss={attack_loss!r} is not one of {list(ATTACK_LOSSES)}.")
        if "word" in attacks and tokenizer is None:
            raise ValueError("The word attack needs the tokenizer, to keep special tokens and subwords out of it.")
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.epsilons = sorted(float(e) for e in epsilons)
        self.attacks = tuple(a for a in ATTACKS if a in attacks)
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size if pgd_step_size is not None else 2.5 / pgd_steps
        self.max_epsilon = float(max_epsilon)
        self.bisection_steps = bisection_steps
        self.word_budget = word_budget
        self.word_neighbours = word_neighbours
        self.attack_loss = attack_loss
        self.seed = seed
        self.disable_tqdm = disable_tqdm
        self.module, weight = find_input_embedding(self.model, embedding_name)
        self.tap = EmbeddingTap(self.module, weight)
        self.hidden_size = weight.shape[-1]
        self.vocab_size = weight.shape[0]
        config = getattr(self.model, "config", None)
        self.problem_type = infer_problem_type(config, None)
        if self.problem_type not in (SINGLE_LABEL, MULTI_LABEL):
            raise ValueError(
                f"Robustness evaluation needs a classification model, not problem_type={self.problem_type!r}."
            )
        self.num_labels = getattr(config, "num_labels", None)
        self._depth = 0
        # Examples through the model's forward and backward: the cost of the evaluation, whatever the hardware.
        self.passes = {"forward": 0, "backward": 0}
        # Wall seconds by part of the evaluation (clean pass, FGM/PGD grid, bisection, word attack).
        self.timings: dict[str, float] = {}
        self._vocabulary: dict[str, torch.Tensor] | None = None
        self._bar: tqdm | None = None  # the progress bar of `evaluate`, while it runs
        self._description = ""

    # -- everything over a data set -----------------------------------------------------------------------------------
    def evaluate(
        self,
        batches: Iterable[dict[str, Any]],
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        description: str = "robustness",
    ) -> dict[str, float]:
        """All configured attacks over `batches`; returns the flat metrics (see `evaluate_robustness`).

        Args:
            gather: when each process sees a shard of the data, collects a per-example tensor from all of them,
                without the duplicates an evenly split last batch adds (`accelerator.gather_for_metrics`); it is
                called once per batch on every process. Only the accuracies are gathered: the minimal perturbation,
                the word attack's rates, `num_examples`, `embedding_norm_mean`, the seconds and the passes are
                those of this process's shard (with the padding examples of its last batch).
        """
        # The caller's random state is left alone (a trainer evaluating mid-training must not shift its dropout).
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self._evaluate(batches, gather, description)

    def _evaluate(
        self,
        batches: Iterable[dict[str, Any]],
        gather: Callable[[torch.Tensor], torch.Tensor] | None,
        description: str,
    ) -> dict[str, float]:
        eps_keys = [epsilon_key(e) for e in self.epsilons]
        keys = ["clean"] + [f"{a}@{k}" for a in ("fgm", "pgd") if a in self.attacks for k in eps_keys]
        if "word" in self.attacks:
            keys.append("word")
        totals = torch.zeros(len(keys), 3, dtype=torch.float64)
        minimal: list[torch.Tensor] = []
        attacked = success = 0
        fractions: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        examples = 0
        start = time.perf_counter()
        passes = dict(self.passes)
        self.timings = {}
        with self.prepared(), self._progress(batches, description) as progress:
            for batch in batches:
                inputs, labels, kept = self._split(batch)
                rows = self._attack_batch(inputs, labels) if labels.shape[0] else {}
                if "minimal" in rows:
                    minimal.append(rows.pop("minimal").cpu())
                if "word_result" in rows:
                    result = rows.pop("word_result")
                    attacked += int(result.attacked.sum())
                    success += int(result.success.sum())
                    changed = result.changed.sum(1).double() / result.num_tokens.clamp_min(1).double()
                    fractions.append(changed[result.success].cpu())
                if "norms" in rows:
                    norms.append(rows.pop("norms").cpu())
                examples += labels.shape[0]
                # One row per example of the batch (zeros for those labelled -100), so that `gather` can drop the
                # duplicated examples of the last batch.
                size = batch["input_ids"].shape[0]
                per_example = torch.zeros(size, len(keys), 3, dtype=torch.float64, device=self.device)
                if rows:
                    per_example[kept] = torch.stack([rows[k] for k in keys], dim=1)
                if gather is not None:
                    per_example = gather(per_example)
                totals += per_example.sum(0).cpu()
                progress.update(size)
                progress.set_postfix(clean=f"{self.metric(totals[0]):.3f}")
        totals = dict(zip(keys, totals))
        metrics: dict[str, Any] = {
            # What every "accuracy" below is: micro-F1 (logits thresholded at 0) for a multi-label model.
            "metric": "f1_micro" if self.problem_type == MULTI_LABEL else "accuracy",
            "attack_loss": self.attack_loss,
            "num_examples": examples,
            # The scale epsilon compares with: the L2 norm of an example's clean embedding output.
            "embedding_norm_mean": float(torch.cat(norms).mean()) if norms else float("nan"),
            "clean_accuracy": self.metric(totals["clean"]),
        }
        for attack in ("fgm", "pgd"):
            if attack in self.attacks:
                for key in eps_keys:
                    metrics[f"{attack}_accuracy@{key}"] = self.metric(totals[f"{attack}@{key}"])
        if "pgd" in self.attacks:
            metrics["pgd_steps"] = self.pgd_steps
        if "min_perturbation" in self.attacks:
            values = torch.cat(minimal) if minimal else torch.empty(0)
            capped = values.clamp(max=self.max_epsilon).tolist()
            metrics["min_perturbation_mean"] = statistics.fmean(capped) if capped else float("nan")
            metrics["min_perturbation_median"] = statistics.median(capped) if capped else float("nan")
            metrics["min_perturbation_unflipped"] = float(torch.isinf(values).double().mean()) if capped else 0.0
        if "word" in self.attacks:
            changed = torch.cat(fractions) if fractions else torch.empty(0)
            metrics["word_attack_success_rate"] = success / attacked if attacked else 0.0
            metrics["word_attack_accuracy"] = self.metric(totals["word"])
            metrics["word_attack_fraction_changed"] = float(changed.mean()) if changed.numel() else 0.0
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        for part, seconds in self.timings.items():
            metrics[f"seconds_{part}"] = round(seconds, 2)
        for kind, count in self.passes.items():
            metrics[f"{kind}_passes_per_example"] = round((count - passes[kind]) / max(examples, 1), 2)
        return metrics

    def _attack_batch(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, attacks: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The configured attacks (those of `attacks` among them) on one batch: per-example metric counts by key,
        and the per-example results."""
        attacks = [a for a in self.attacks if attacks is None or a in attacks]
        mask = self._mask(inputs)
        with self._timed("clean"):
            with torch.no_grad():
                embedded = self.module(inputs["input_ids"]).float() * mask
            logits, direction, direction_prediction = self.clean(
                inputs, labels, prediction_direction="min_perturbation" in attacks
            )
        clean = self.predict(logits)
        rows: dict[str, Any] = {"clean": self.counts(clean, labels), "norms": embedded.flatten(1).norm(dim=1)}
        bracket = None
        if "fgm" in attacks or "pgd" in attacks:
            with self._timed("fgm_pgd"):
                grid, bracket = self._grid(inputs, mask, labels, clean, direction, attacks)
            rows.update(grid)
        if "min_perturbation" in attacks:
            with self._timed("min_perturbation"):
                rows["minimal"], rows["minimal_lower"] = self._bisect(inputs, clean, direction_prediction, bracket)
        if "word" in attacks:
            with self._timed("word"):
                result = self._word_attack(inputs, labels, clean, direction)
            rows["word"] = self.counts(result.predictions, labels)
            rows["word_result"] = result
        return rows

    @contextlib.contextmanager
    def _progress(self, batches: Iterable[dict[str, Any]], description: str) -> Iterator[tqdm]:
        """A progress bar counting examples (batches of minutes each would sit at 0/1 for long), with the attack
        under way in its description."""
        dataset = getattr(batches, "dataset", None)
        total = len(dataset) if hasattr(dataset, "__len__") else None
        progress = tqdm(total=total, desc=description, unit="example", disable=self.disable_tqdm, dynamic_ncols=True)
        self._bar, self._description = progress, description
        try:
            yield progress
        finally:
            self._bar = None
            progress.close()

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_description(f"{self._description} [{ATTACK_LABELS.get(part, part)}]", refresh=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - start
