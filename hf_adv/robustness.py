"""Robustness evaluation: clean accuracy, accuracy under embedding-space attacks, the minimal adversarial
perturbation, and a word-substitution attack, for single-label and multi-label classifiers.

Function API::

    from hf_adv.robustness import evaluate_robustness, write_report

    metrics = evaluate_robustness(model, eval_dataset, tokenizer, epsilons=[0.1, 0.25, 0.5])
    write_report({"fgm": metrics}, "robustness/")  # robustness.json, robustness.md, robustness.png

`adversarial_accuracy(model, dataloader, epsilons)` is the cheap part (PGD only) that
`AdversarialTrainer.evaluate()` reports as `eval_adv_accuracy@{eps}`.

CLI (one line per model in the plot; `--results` adds the JSON of earlier runs to the same table and figure)::

    python -m hf_adv.robustness --model_paths out/none out/fgm --model_names none fgm \\
        --dataset ../shared/data/imdb/test.csv.gz --num_examples 1000 --output_dir docs/robustness

What is attacked, and how:

- Embedding attacks perturb the output of the input word embedding (`model.get_input_embeddings()`), as adversarial
  training does (Miyato et al., "Adversarial Training Methods for Semi-Supervised Text Classification", ICLR 2017;
  Zhu et al., "FreeLB", ICLR 2020). The perturbation of one example is bounded in L2 norm over all its (non-padding)
  positions, and maximizes the model's own loss on the true labels: cross-entropy, or BCE for multi-label models.
- FGM: one step eps * g / ||g||. PGD-K (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018): the FGM point, then K - 1 steps of `step_size * eps` along the normalized gradient, each
  projected back onto the eps-ball. An example counts as fooled when any point the attack visited fools the model
  (the clean input, the FGM point, every iterate), and when it was fooled at a smaller epsilon of the grid, since
  that adversarial input lies in the larger ball too. So PGD is never weaker than FGM, never better than clean,
  and accuracy under PGD never rises with epsilon.
- Minimal perturbation (the robustness measure of Papernot et al., "Distillation as a Defense to Adversarial
  Perturbations against Deep Neural Networks", IEEE S&P 2016): per example, the smallest eps at which PGD changes
  the model's prediction (any label for multi-label models), found by bisection on [0, max_epsilon].
- Word substitution (Papernot et al., "Crafting Adversarial Input Sequences for Recurrent Neural Networks", MILCOM
  2016; Ebrahimi et al., "HotFlip", ACL 2018): greedily, one token per step, the substitution w -> w' with the
  largest first-order loss increase (e_w' - e_w) . g, w' among the `word_neighbours` nearest tokens to w by cosine
  similarity in the model's own input embedding, until the prediction gets worse or the budget is spent.

Evaluation computes no parameter gradient, never writes a weight, and leaves every module in the train/eval mode
it found it in.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .embedding import EmbeddingTap, find_input_embedding, unwrap_model
from .losses import IGNORE_INDEX, MULTI_LABEL, SINGLE_LABEL, infer_problem_type
from .methods.vat import normalize_per_example

ATTACKS = ("fgm", "pgd", "min_perturbation", "word")
LABEL_KEYS = ("labels", "label")


def epsilon_key(epsilon: float) -> str:
    """How an epsilon is written in metric names: `pgd_accuracy@0.5`, `adv_accuracy@1`."""
    return f"{epsilon:g}"


def _select(inputs: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in inputs.items()}


def _project(delta: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Scale each example of `delta` back onto the L2 ball of its radius `epsilon` when it is outside."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (epsilon / norms).clamp(max=1.0).view(-1, 1, 1)


@dataclass
class WordAttackResult:
    """What the word-substitution attack did to one batch (one row per example).

    Attributes:
        input_ids (`torch.Tensor`): the attacked token ids.
        changed (`torch.Tensor`): bool, positions whose token was replaced.
        attacked (`torch.Tensor`): bool, examples the attack tried (single-label: those predicted correctly).
        success (`torch.Tensor`): bool, attacked examples whose prediction got worse.
        budget (`torch.Tensor`): the number of tokens each example was allowed to change.
        num_tokens (`torch.Tensor`): non-special, non-padding tokens of each example.
        predictions (`torch.Tensor`): predictions on the attacked inputs.
    """

    input_ids: torch.Tensor
    changed: torch.Tensor
    attacked: torch.Tensor
    success: torch.Tensor
    budget: torch.Tensor
    num_tokens: torch.Tensor
    predictions: torch.Tensor


class RobustnessEvaluator:
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

    # -- leaving the model as found -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Eval mode, no parameter gradients and the embedding hook for the block; every module's mode and every
        parameter's `requires_grad` are put back on exit (re-entrant)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._depth = 1
        try:
            self.model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with self.tap.attached():
                yield
        finally:
            self._depth = 0
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
            self.tap.reset()

    # -- the model on a batch -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.tap.weight.device

    def split_batch(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs on the model's device and labels, without the examples whose label is -100."""
        inputs, labels, _ = self._split(batch)
        return inputs, labels

    def _split(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if labels is None:
            raise ValueError(f"The batch has no labels (keys {sorted(batch)}): attacks maximize the loss on labels.")
        inputs = {
            k: v.to(self.device) for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)
        }
        labels = torch.as_tensor(labels).to(self.device)
        if self.problem_type == MULTI_LABEL:
            labels = labels.float()
            keep = (labels != IGNORE_INDEX).any(-1)
        else:
            labels = labels.long().reshape(-1)
            keep = labels != IGNORE_INDEX
        index = keep.nonzero().squeeze(1)
        if not keep.all():
            inputs, labels = _select(inputs, index), labels[index]
        return inputs, labels, index

    def _mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        return mask.unsqueeze(-1).float()

    def _call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.passes["forward"] += inputs["input_ids"].shape[0]
        outputs = self.model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return logits.float()

    def logits(self, inputs: dict[str, torch.Tensor], delta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with `delta` added to the embedding output, no gradient."""
        with self.prepared(), torch.no_grad():
            shift = self.tap.shifted(delta) if delta is not None else contextlib.nullcontext()
            with shift:
                return self._call(inputs)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's own loss summed over examples, so that each example's gradient is its own."""
        if self.problem_type == MULTI_LABEL:
            return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")
        return F.cross_entropy(logits, targets, reduction="sum")

    def logits_and_grads(
        self,
        inputs: dict[str, torch.Tensor],
        delta: torch.Tensor | None,
        targets: Sequence[torch.Tensor | Callable[[torch.Tensor], torch.Tensor]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits at `delta` and, for each target, the gradient of the loss with respect to the embedding output.

        A target may be a function of the (detached) logits, to attack the model's own prediction.
        """
        input_ids = inputs["input_ids"]
        if delta is None:
            delta = torch.zeros(*input_ids.shape, self.hidden_size, device=input_ids.device)
        delta = delta.detach().requires_grad_(True)
        with self.prepared(), torch.enable_grad(), self.tap.shifted(delta):
            logits = self._call(inputs)
            self.tap.reset()
            grads = []
            for i, target in enumerate(targets):
                target = target(logits.detach()) if callable(target) else target
                (grad,) = torch.autograd.grad(self._loss(logits, target), delta, retain_graph=i < len(targets) - 1)
                self.passes["backward"] += logits.shape[0]
                grads.append(grad)
        return logits.detach(), grads

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits > 0 if self.problem_type == MULTI_LABEL else logits.argmax(-1)

    def as_target(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction.float() if self.problem_type == MULTI_LABEL else prediction

    def errors(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Wrong labels per example: 0 or 1 for single-label models, the Hamming distance for multi-label ones."""
        if self.problem_type == MULTI_LABEL:
            return (prediction != (labels > 0.5)).sum(-1)
        return (prediction != labels).long()

    def flipped(self, prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.problem_type == MULTI_LABEL:
            return (prediction != reference).any(-1).long()
        return (prediction != reference).long()

    def max_errors(self, labels: torch.Tensor) -> int:
        return labels.shape[-1] if self.problem_type == MULTI_LABEL else 1

    def counts(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per example, what the metric sums: (correct, 1, 0) for accuracy, (tp, fp, fn) for micro-F1."""
        if self.problem_type == MULTI_LABEL:
            truth = labels > 0.5
            rows = [(prediction & truth).sum(-1), (prediction & ~truth).sum(-1), (~prediction & truth).sum(-1)]
            return torch.stack(rows, dim=-1).double()
        correct = (prediction == labels).double()
        return torch.stack([correct, torch.ones_like(correct), torch.zeros_like(correct)], dim=-1)

    def metric(self, counts: torch.Tensor) -> float:
        a, b, c = (float(x) for x in counts)
        if self.problem_type == MULTI_LABEL:
            return 2 * a / (2 * a + b + c) if a + b + c > 0 else 0.0
        return a / b if b > 0 else float("nan")

    # -- PGD ---------------------------------------------------------------------------------------------------------
    def _pgd(
        self,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
        targets: torch.Tensor,
        epsilon: torch.Tensor,
        direction: torch.Tensor,
        index: torch.Tensor,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        goal: torch.Tensor,
        best_prediction: torch.Tensor,
        best_score: torch.Tensor,
    ) -> torch.Tensor | None:
        """PGD on the examples `index`, keeping in `best_prediction` / `best_score` (updated in place) the visited
        point of highest `score(prediction, index)`; an example stops once its score reaches `goal`.

        `direction` is the normalized clean gradient: the first iterate is `epsilon * direction`, the FGM point.
        Returns the predictions at the FGM point of the examples `index`.
        """
        if index.numel() == 0:
            return None
        first = None
        delta = epsilon[index].view(-1, 1, 1) * direction[index]
        for step in range(self.pgd_steps):
            sub = _select(inputs, index)
            last = step == self.pgd_steps - 1
            if last:
                logits, grad = self.logits(sub, delta), None
            else:
                logits, (grad,) = self.logits_and_grads(sub, delta, [targets[index]])
            prediction = self.predict(logits)
            if first is None:
                first = prediction
            value = score(prediction, index)
            better = value > best_score[index]
            best_prediction[index[better]] = prediction[better]
            best_score[index[better]] = value[better]
            if last:
                break
            going = best_score[index] < goal[index]
            if not going.any():
                break
            index, delta, grad = index[going], delta[going], grad[going]
            alpha = self.pgd_step_size * epsilon[index]
            delta = delta + alpha.view(-1, 1, 1) * normalize_per_example(grad * mask[index])
            delta = _project(delta, epsilon[index])
        return first

    def clean(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, prediction_direction: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Clean logits, and the normalized gradients with respect to the embedding output of the loss on the labels
        and (if `prediction_direction`) on the model's own prediction: the FGM directions of the two objectives."""
        mask = self._mask(inputs)
        targets: list = [labels]
        if prediction_direction:
            targets.append(lambda logits: self.as_target(self.predict(logits)))
        logits, grads = self.logits_and_grads(inputs, None, targets)
        directions = [normalize_per_example(grad * mask) for grad in grads]
        return logits, directions[0], directions[1] if prediction_direction else None

    def pgd(self, batch: dict[str, Any], epsilon: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Attack one batch at `epsilon` (a float, or one value per example); returns the predictions `clean`, `fgm`
        and `pgd` (at the most wrong point PGD visited, the clean input included) and the `labels`."""
        inputs, labels = self.split_batch(batch)
        with self.prepared():
            mask = self._mask(inputs)
            logits, direction, _ = self.clean(inputs, labels, prediction_direction=False)
            clean = self.predict(logits)
            eps = torch.as_tensor(epsilon, dtype=torch.float32, device=self.device).expand(labels.shape[0])
            eps = eps.contiguous()
            fgm = self.predict(self.logits(inputs, eps.view(-1, 1, 1) * direction))
            best, best_score = clean.clone(), self.errors(clean, labels)
            goal = torch.full_like(best_score, self.max_errors(labels))
            index = (best_score < goal).nonzero().squeeze(1)
            score = lambda p, i: self.errors(p, labels[i])  # noqa: E731
            self._pgd(inputs, mask, labels, eps, direction, index, score, goal, best, best_score)
        return {"clean": clean, "fgm": fgm, "pgd": best, "labels": labels}

    # -- minimal perturbation -----------------------------------------------------------------------------------------
    def _flips(
        self,
        inputs: dict[str, torch.Tensor],
        clean: torch.Tensor,
        direction: torch.Tensor,
        epsilon: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """PGD on the loss of the model's own prediction: does it change the prediction of the examples `index`?"""
        n = clean.shape[0]
        best, best_score = clean.clone(), torch.zeros(n, dtype=torch.long, device=self.device)
        goal = torch.ones(n, dtype=torch.long, device=self.device)
        score = lambda p, i: self.flipped(p, clean[i])  # noqa: E731
        self._pgd(
            inputs, self._mask(inputs), self.as_target(clean), epsilon, direction, index, score, goal, best, best_score
        )
        return best_score[index] >= 1

    def _bisect(
        self,
        inputs: dict[str, torch.Tensor],
        clean: torch.Tensor,
        direction: torch.Tensor,
        bracket: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bisection until upper - lower <= max_epsilon / 2**bisection_steps, PGD flipping the prediction at `upper`
        and not at `lower`. `bracket` gives such a pair where known (inf upper where not): the PGD grid did the
        same test for correctly classified single-label examples, and bisecting from there saves rounds."""
        n = clean.shape[0]
        precision = self.max_epsilon / 2**self.bisection_steps * (1 + 1e-6)
        if bracket is None:
            lower = torch.zeros(n, device=self.device)
            upper = torch.full((n,), math.inf, device=self.device)
        else:
            lower, upper = (b.clone().float() for b in bracket)
        unknown = (~torch.isfinite(upper)).nonzero().squeeze(1)
        if unknown.numel():
            at_max = torch.full((n,), self.max_epsilon, device=self.device)
            flip = self._flips(inputs, clean, direction, at_max, unknown)
            upper[unknown[flip]] = self.max_epsilon
            lower[unknown[~flip]] = self.max_epsilon
        while True:
            index = (torch.isfinite(upper) & (upper - lower > precision)).nonzero().squeeze(1)
            if index.numel() == 0:
                break
            middle = (lower + upper) / 2
            flip = self._flips(inputs, clean, direction, middle, index)
            upper[index[flip]] = middle[index[flip]]
            lower[index[~flip]] = middle[index[~flip]]
        return upper, lower

    def prediction_flips(self, batch: dict[str, Any], epsilon: float | torch.Tensor) -> torch.Tensor:
        """Whether PGD at `epsilon` (a float, or one value per example) changes each example's prediction: the
        test that the bisection of `minimal_perturbation` runs."""
        inputs, labels = self.split_batch(batch)
        with self.prepared():
            logits, _, direction = self.clean(inputs, labels)
            clean = self.predict(logits)
            n = clean.shape[0]
            eps = torch.as_tensor(epsilon, dtype=torch.float32, device=self.device).expand(n).contiguous()
            return self._flips(inputs, clean, direction, eps, torch.arange(n, device=self.device))

    def minimal_perturbation(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per example, `upper`: an epsilon at which PGD flips the prediction (inf when it cannot at
        `max_epsilon`), and `lower`: an epsilon at which it does not, upper - lower <= max_epsilon /
        2**bisection_steps. As in `evaluate`, the PGD grid (when `"pgd"` is among the attacks) seeds the bisection."""
        inputs, labels = self.split_batch(batch)
        with self.prepared():
            rows = self._attack_batch(inputs, labels, attacks=("pgd", "min_perturbation"))
        return {"upper": rows["minimal"], "lower": rows["minimal_lower"]}

    # -- word substitution --------------------------------------------------------------------------------------------
    def vocabulary(self) -> dict[str, torch.Tensor]:
        """Per token id: `special` (the tokenizer's special tokens, `[unused0]`-like and out-of-tokenizer rows),
        `continuation` (a subword fragment: `##ing`, or a SentencePiece/BPE piece without the word-start mark) and
        `word` (neither, with a letter in it: may be replaced and may replace); and the embedding output of every
        token, `table`."""
        if self._vocabulary is not None:
            return self._vocabulary
        size = self.vocab_size
        tokens = [None] * size
        known = min(size, len(self.tokenizer))
        for i, token in enumerate(self.tokenizer.convert_ids_to_tokens(list(range(known)))):
            tokens[i] = token
        present = [t for t in tokens if t]
        if any(t.startswith("##") for t in present):
            is_continuation = lambda t: t.startswith("##")  # noqa: E731  WordPiece
        elif sum(t.startswith("\u2581") for t in present) > len(present) // 10:
            is_continuation = lambda t: not t.startswith("\u2581")  # noqa: E731  SentencePiece
        elif sum(t.startswith("\u0120") for t in present) > len(present) // 10:
            is_continuation = lambda t: not t.startswith("\u0120")  # noqa: E731  byte-level BPE
        else:
            is_continuation = lambda t: False  # noqa: E731
        special_ids = set(self.tokenizer.all_special_ids)
        bracketed = re.compile(r"^(\[.*\]|<.*>)$")
        special = torch.zeros(size, dtype=torch.bool)
        continuation = torch.zeros(size, dtype=torch.bool)
        word = torch.zeros(size, dtype=torch.bool)
        for i, token in enumerate(tokens):
            if token is None or i in special_ids or bracketed.match(token):
                special[i] = True
                continue
            continuation[i] = is_continuation(token)
            word[i] = not continuation[i] and any(c.isalpha() for c in token)
        with self.prepared(), torch.no_grad():
            table = self.module(torch.arange(size, device=self.device)).float()
        self._vocabulary = {
            "special": special.to(self.device),
            "continuation": continuation.to(self.device),
            "word": word.to(self.device),
            "candidates": word.nonzero().squeeze(1).to(self.device),
            "table": table,
            "neighbours": torch.full((size, self.word_neighbours), -1, dtype=torch.long, device=self.device),
            "known": torch.zeros(size, dtype=torch.bool, device=self.device),
        }
        return self._vocabulary

    def neighbours(self, ids: torch.Tensor) -> torch.Tensor:
        """The `word_neighbours` word tokens nearest to each id by cosine similarity (-1 where there are fewer)."""
        vocab = self.vocabulary()
        wanted = torch.unique(ids)
        missing = wanted[~vocab["known"][wanted]]
        if missing.numel():
            normed = F.normalize(vocab["table"], dim=-1)
            candidates = vocab["candidates"]
            normed_candidates = normed[candidates]
            k = min(self.word_neighbours, candidates.numel())
            for chunk in missing.split(512):
                similarity = normed[chunk] @ normed_candidates.T
                similarity[candidates.unsqueeze(0) == chunk.unsqueeze(1)] = -math.inf
                values, top = similarity.topk(k, dim=-1)
                neighbours = torch.where(torch.isfinite(values), candidates[top], -1)
                vocab["neighbours"][chunk, :k] = neighbours
            vocab["known"][missing] = True
        return vocab["neighbours"][ids]

    def _word_attack(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        clean: torch.Tensor,
        direction: torch.Tensor,
    ) -> WordAttackResult:
        vocab = self.vocabulary()
        ids = inputs["input_ids"].clone()
        n = ids.shape[0]
        attention = self._mask(inputs).squeeze(-1).bool()
        real = attention & ~vocab["special"][ids]
        num_tokens = real.sum(1)
        next_is_fragment = torch.zeros_like(real)
        next_is_fragment[:, :-1] = vocab["continuation"][ids[:, 1:]] & attention[:, 1:]
        replaceable = real & vocab["word"][ids] & ~next_is_fragment
        if self.word_budget >= 1:
            budget = torch.full_like(num_tokens, int(self.word_budget))
        else:
            budget = (self.word_budget * num_tokens.double()).floor().long().clamp_min(1)
        budget = torch.minimum(budget, replaceable.sum(1))
        clean_errors = self.errors(clean, labels)
        attacked = clean_errors < self.max_errors(labels)
        goal = clean_errors + 1
        changed = torch.zeros_like(real)
        n_changed = torch.zeros_like(num_tokens)
        predictions = clean.clone()
        success = torch.zeros(n, dtype=torch.bool, device=self.device)
        index = (attacked & (budget > 0)).nonzero().squeeze(1)
        # The first-order score needs the raw gradient; its normalized clean version ranks the same.
        grad = direction[index]
        table = vocab["table"]
        while index.numel():
            current = ids[index]
            candidates = self.neighbours(current)  # (b, T, k)
            k = candidates.shape[-1]
            gain = torch.einsum("btkh,bth->btk", table[candidates.clamp_min(0)], grad)
            gain = gain - torch.einsum("bth,bth->bt", table[current], grad).unsqueeze(-1)
            allowed = (replaceable[index] & ~changed[index]).unsqueeze(-1) & (candidates >= 0)
            gain = gain.masked_fill(~allowed, -math.inf)
            value, flat = gain.flatten(1).max(dim=1)
            can = torch.isfinite(value)
            index, flat, candidates, grad = index[can], flat[can], candidates[can], grad[can]
            if index.numel() == 0:
                break
            position, choice = flat // k, flat % k
            rows = torch.arange(index.numel(), device=self.device)
            ids[index, position] = candidates[rows, position, choice]
            changed[index, position] = True
            n_changed[index] += 1

            more = n_changed[index] < budget[index]
            sub = {**_select(inputs, index), "input_ids": ids[index]}
            prediction = torch.empty_like(predictions[index])
            grad = torch.empty(0, *ids.shape[1:], self.hidden_size, device=self.device)
            if more.any():
                more_index = more.nonzero().squeeze(1)
                logits, (grad,) = self.logits_and_grads(_select(sub, more_index), None, [labels[index[more_index]]])
                prediction[more_index] = self.predict(logits)
            if not more.all():
                done_index = (~more).nonzero().squeeze(1)
                prediction[done_index] = self.predict(self.logits(_select(sub, done_index)))
            predictions[index] = prediction
            won = self.errors(prediction, labels[index]) >= goal[index]
            success[index[won]] = True
            keep = ~won & more
            grad = grad[~won[more]]
            index = index[keep]
        return WordAttackResult(
            input_ids=ids,
            changed=changed,
            attacked=attacked,
            success=success,
            budget=budget,
            num_tokens=num_tokens,
            predictions=predictions,
        )

    def word_attack(self, batch: dict[str, Any]) -> WordAttackResult:
        """Run the word-substitution attack on one batch (examples labelled -100 are dropped first)."""
        if self.tokenizer is None:
            raise ValueError("The word attack needs the tokenizer.")
        inputs, labels = self.split_batch(batch)
        with self.prepared():
            logits, direction, _ = self.clean(inputs, labels, prediction_direction=False)
            return self._word_attack(inputs, labels, self.predict(logits), direction)

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
        total = len(batches) if hasattr(batches, "__len__") else None
        with self.prepared():
            progress = tqdm(batches, total=total, desc=description, disable=self.disable_tqdm, dynamic_ncols=True)
            for batch in progress:
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
                progress.set_postfix(clean=f"{self.metric(totals[0]):.3f}")
        totals = dict(zip(keys, totals))
        metrics: dict[str, float] = {
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
    def _timed(self, part: str) -> Iterator[None]:
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

    def _grid(
        self,
        inputs: dict[str, torch.Tensor],
        mask: torch.Tensor,
        labels: torch.Tensor,
        clean: torch.Tensor,
        direction: torch.Tensor,
        attacks: Sequence[str],
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """FGM and PGD at each epsilon: per-example counts by key, and the bisection bracket the PGD runs give."""
        n = labels.shape[0]
        rows = {}
        best, best_score = clean.clone(), self.errors(clean, labels)
        goal = torch.full_like(best_score, self.max_errors(labels))
        score = lambda p, i: self.errors(p, labels[i])  # noqa: E731
        everyone = torch.arange(n, device=self.device)
        # For a single-label example predicted correctly, PGD on its label is PGD on its prediction: the largest
        # epsilon at which it failed and the one at which it first succeeded bracket the minimal perturbation.
        bracketed = (best_score == 0) if self.problem_type == SINGLE_LABEL and "pgd" in attacks else None
        lower = torch.zeros(n, device=self.device)
        upper = torch.full((n,), math.inf, device=self.device)
        for epsilon in self.epsilons:
            key = epsilon_key(epsilon)
            eps = torch.full((n,), epsilon, device=self.device)
            if "pgd" in attacks:
                # Examples already fooled (clean, or at a smaller epsilon) stay fooled; PGD runs on the others.
                active = best_score < goal
                first = self._pgd(
                    inputs, mask, labels, eps, direction, everyone[active], score, goal, best, best_score
                )
                rows[f"pgd@{key}"] = self.counts(best, labels)
                if epsilon <= self.max_epsilon:
                    fooled = best_score >= goal
                    upper[active & fooled] = epsilon
                    lower[active & ~fooled] = epsilon
            else:
                active, first = torch.zeros(n, dtype=torch.bool, device=self.device), None
            if "fgm" in attacks:
                fgm = clean.clone()
                if first is not None:
                    fgm[active] = first
                rest = everyone[~active]
                if rest.numel():
                    point = eps[rest].view(-1, 1, 1) * direction[rest]
                    fgm[rest] = self.predict(self.logits(_select(inputs, rest), point))
                rows[f"fgm@{key}"] = self.counts(fgm, labels)
        if bracketed is None:
            return rows, None
        lower = torch.where(bracketed, lower, 0.0)
        upper = torch.where(bracketed, upper, math.inf)
        return rows, (lower, upper)


# -- data -------------------------------------------------------------------------------------------------------------
def _labels_to_multi_hot(value, num_labels: int) -> list[float]:
    if isinstance(value, str):
        ids = [int(x) for x in value.replace(" ", "").split(",") if x]
    elif isinstance(value, int | float):
        ids = [int(value)]
    else:
        value = list(value)
        if len(value) == num_labels and all(v in (0, 1) for v in value):
            return [float(v) for v in value]
        ids = [int(v) for v in value]
    hot = [0.0] * num_labels
    for i in ids:
        hot[i] = 1.0
    return hot


def build_dataloader(
    data,
    tokenizer=None,
    *,
    problem_type: str = SINGLE_LABEL,
    num_labels: int = 2,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    batch_size: int = 32,
) -> torch.utils.data.DataLoader | Iterable[dict[str, Any]]:
    """Batches for the evaluator from a data loader (returned as is), a tokenized data set (`input_ids`) or a data
    set of raw text (tokenized here). Examples are batched by length, to pad as little as possible."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    columns = getattr(data, "column_names", None) or list(data[0].keys())
    label_key = next((k for k in (label_column, *LABEL_KEYS) if k in columns), None)
    if label_key is None:
        raise ValueError(f"No label column {label_column!r} in the data set (columns: {columns}).")
    features = []
    if "input_ids" in columns:
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in columns]
        for row in data:
            features.append({**{k: row[k] for k in keep}, "labels": row[label_key]})
    else:
        if tokenizer is None:
            raise ValueError("The data set holds raw text: pass the tokenizer.")
        rows = list(data)
        texts = [row[text_column] for row in rows]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        for i, row in enumerate(rows):
            features.append({k: encoded[k][i] for k in encoded.keys()} | {"labels": row[label_key]})
    for feature in features:
        if problem_type == MULTI_LABEL:
            feature["labels"] = _labels_to_multi_hot(feature["labels"], num_labels)
        else:
            feature["labels"] = int(feature["labels"])
    features.sort(key=lambda f: len(f["input_ids"]))
    if tokenizer is not None:
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tokenizer)
    else:
        from transformers import default_data_collator as collate
    return torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=False, collate_fn=collate)


# -- function API -----------------------------------------------------------------------------------------------------
def load_model(path: str, device: str | torch.device | None = None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    return model.to(device) if device is not None else model


def evaluate_robustness(
    model: nn.Module | str,
    data,
    tokenizer=None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    **evaluator_kwargs,
) -> dict[str, float]:
    """Clean accuracy and accuracy under attack of one model; see `RobustnessEvaluator` for the attack settings.

    Args:
        model (`nn.Module` or `str`): the model, or a folder to load it from with
            `AutoModelForSequenceClassification.from_pretrained`.
        data: a `DataLoader` of batches with labels, a tokenized data set, or a data set (or list of dicts) of raw
            text in `text_column` with labels in `label_column` (class ids; for multi-label models lists of label ids,
            comma-separated ids, or multi-hot vectors).
        tokenizer (*optional*): the tokenizer or its folder; by default loaded from `model` when it is a folder.

    Returns:
        `dict[str, float]`: `num_examples`; `embedding_norm_mean` (the L2 norm of a clean example's embedding output,
        the scale of epsilon); `clean_accuracy`, `fgm_accuracy@{eps}`, `pgd_accuracy@{eps}`;
        `min_perturbation_mean`, `min_perturbation_median`, `min_perturbation_unflipped` (the fraction of examples
        PGD could not flip at `max_epsilon`, counted as `max_epsilon` in the mean and median);
        `word_attack_success_rate` (among the examples attacked: single-label, those predicted correctly; multi-label,
        those with a label left to get wrong), `word_attack_accuracy`, `word_attack_fraction_changed` (mean over the
        successful attacks of changed tokens / tokens); `seconds` and its parts `seconds_clean`, `seconds_fgm_pgd`,
        `seconds_min_perturbation`, `seconds_word` (wall time of each attack that ran), and
        `forward_passes_per_example` / `backward_passes_per_example` (the cost: examples through the model per
        evaluated example). For multi-label
        models every "accuracy" is micro-F1 with logits thresholded at 0.
    """
    if isinstance(tokenizer, str) or (tokenizer is None and isinstance(model, str)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer if isinstance(tokenizer, str) else model)
    if isinstance(model, str):
        model = load_model(model, device)
    elif device is not None:
        model = model.to(device)
    description = evaluator_kwargs.pop("description", "robustness")
    evaluator = RobustnessEvaluator(model, tokenizer, **evaluator_kwargs)
    batches = build_dataloader(
        data,
        tokenizer,
        problem_type=evaluator.problem_type,
        num_labels=evaluator.num_labels,
        text_column=text_column,
        label_column=label_column,
        max_length=max_length,
        batch_size=batch_size,
    )
    return evaluator.evaluate(batches, description=description)


def adversarial_accuracy(
    model: nn.Module,
    dataloader: Iterable[dict[str, Any]],
    epsilons: Sequence[float],
    steps: int = 5,
    step_size: float | None = None,
    *,
    method: str = "pgd",
    embedding_name: str | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    disable_tqdm: bool = False,
) -> dict[str, float]:
    """Accuracy (micro-F1 for multi-label models) under PGD-`steps` (or FGM) at each epsilon, as
    `{"adv_accuracy@{eps}": value}`: what `AdversarialTrainer.evaluate()` adds as `eval_adv_accuracy@{eps}`.

    Args:
        model (`nn.Module`): the model; its weights, gradients and train/eval mode are left as found.
        dataloader: batches as the model takes them, with `labels`.
        epsilons (`Sequence[float]`): L2 radii per example on the embedding output.
        steps (`int`, *optional*, defaults to `5`): PGD iterates.
        step_size (`float`, *optional*): see `RobustnessEvaluator.pgd_step_size`.
        method (`str`, *optional*, defaults to `"pgd"`): `"pgd"` or `"fgm"`.
        gather (*optional*): `accelerator.gather_for_metrics` when each process sees a shard of the data.
    """
    if method not in ("pgd", "fgm"):
        raise ValueError(f"method must be 'pgd' or 'fgm', got {method!r}.")
    evaluator = RobustnessEvaluator(
        model,
        epsilons=epsilons,
        attacks=(method,),
        pgd_steps=steps,
        pgd_step_size=step_size,
        embedding_name=embedding_name,
        disable_tqdm=disable_tqdm,
    )
    metrics = evaluator.evaluate(dataloader, gather=gather, description=f"{method} accuracy")
    return {f"adv_accuracy@{epsilon_key(e)}": metrics[f"{method}_accuracy@{epsilon_key(e)}"] for e in epsilons}


# -- report -----------------------------------------------------------------------------------------------------------
def _epsilon_series(metrics: dict[str, Any], attack: str) -> list[tuple[float, float]]:
    prefix = f"{attack}_accuracy@"
    points = [(float(k[len(prefix) :]), v) for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(points)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model: clean, FGM and PGD at each epsilon, minimal perturbation, word attack (percentages)."""
    names = list(results)
    metric_name = "micro-F1" if any(r.get("metric") == "f1_micro" for r in results.values()) else "accuracy"
    epsilons = {a: sorted({e for r in results.values() for e, _ in _epsilon_series(r, a)}) for a in ("fgm", "pgd")}
    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("model", lambda r: r["_name"]),
        (f"clean {metric_name}", lambda r: _percent(r.get("clean_accuracy"))),
    ]
    for attack in ("fgm", "pgd"):
        label = "FGM" if attack == "fgm" else f"PGD-{_steps(results)}"
        for e in epsilons[attack]:
            key = f"{attack}_accuracy@{epsilon_key(e)}"
            columns.append((f"{label} eps {epsilon_key(e)}", lambda r, key=key: _percent(r.get(key))))
    has_minimal = any("min_perturbation_mean" in r for r in results.values())
    has_word = any("word_attack_success_rate" in r for r in results.values())
    if has_minimal:
        columns += [
            ("min. perturbation mean", lambda r: _number(r.get("min_perturbation_mean"))),
            ("median", lambda r: _number(r.get("min_perturbation_median"))),
            ("unflipped", lambda r: _percent(r.get("min_perturbation_unflipped"))),
        ]
    if has_word:
        columns += [
            ("word attack success", lambda r: _percent(r.get("word_attack_success_rate"))),
            (f"{metric_name} under word attack", lambda r: _percent(r.get("word_attack_accuracy"))),
            ("tokens changed", lambda r: _percent(r.get("word_attack_fraction_changed"))),
        ]
    lines = [
        "| " + " | ".join(c for c, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for name in names:
        row = {**results[name], "_name": name}
        lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
    lines.append("")
    lines.append(_units(metric_name, has_minimal, has_word))
    return "\n".join(lines) + "\n"


def _units(metric_name: str, has_minimal: bool, has_word: bool) -> str:
    """The table's footnote: the units of the columns it has."""
    percent = metric_name[0].upper() + metric_name[1:] + (", success rates and tokens changed" if has_word else "")
    norms = "epsilon and minimal perturbation" if has_minimal else "epsilon"
    return f"{percent} in %; {norms} in L2 norm per example of the input embedding output."


def _steps(results: dict[str, dict[str, Any]]) -> str:
    steps = {r.get("pgd_steps", r.get("settings", {}).get("pgd_steps")) for r in results.values()} - {None}
    return str(steps.pop()) if len(steps) == 1 else "K"


def _percent(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _plot_title(results: dict[str, dict[str, Any]], metric_name: str) -> str:
    """The plot's title, naming only the attacks it shows."""
    shown = {a for metrics in results.values() for a in ("pgd", "fgm") if _epsilon_series(metrics, a)}
    parts = [f"PGD-{_steps(results)} (solid)"] if "pgd" in shown else []
    parts += ["FGM (dashed)"] if "fgm" in shown else []
    return f"{metric_name} under " + " and ".join(parts) if parts else f"clean {metric_name}"


def plot_accuracy(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against epsilon, one colour per model: PGD solid, FGM dashed, clean accuracy at epsilon 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_name = "micro-F1" if any(r.get("metric") == "f1_micro" for r in results.values()) else "accuracy"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (name, metrics) in enumerate(results.items()):
        color = f"C{i % 10}"
        clean = metrics.get("clean_accuracy")
        for attack, style in (("pgd", "-"), ("fgm", "--")):
            points = _epsilon_series(metrics, attack)
            if not points:
                continue
            if clean is not None:
                points = [(0.0, clean), *points]
            xs, ys = zip(*points)
            label = name if attack == "pgd" else f"{name}, FGM attack"
            ax.plot(
                xs, [100 * y for y in ys], style, color=color, marker="o" if attack == "pgd" else None, label=label
            )
    ax.set_xlabel("epsilon (L2 per example, input embedding output)")
    ax.set_ylabel(f"{metric_name} under attack (%)")
    ax.set_title(_plot_title(results, metric_name))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    results: dict[str, dict[str, Any]], output_dir: str | Path, stem: str = "robustness"
) -> dict[str, Path]:
    """Write `{stem}.json`, `{stem}.md` and `{stem}.png` (if matplotlib is installed) for `{model name: metrics}`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps({"models": results}, indent=2, allow_nan=True) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    try:
        paths["plot"] = plot_accuracy(results, output_dir / f"{stem}.png")
    except ImportError:  # matplotlib is an optional dependency (`pip install hf-adv[plots]`)
        pass
    return paths


def read_results(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Merge the `models` of several JSON reports (later files win on a name clash)."""
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        results.update(json.loads(Path(path).read_text())["models"])
    return results


# -- CLI --------------------------------------------------------------------------------------------------------------
@dataclass
class RobustnessArguments:
    """Flags of `python -m hf_adv.robustness` (a single `.json` or `.yaml` argument is read as a config file)."""

    # -- models ---------------------------------------------------------------------------------------------------
    model_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Model folders to evaluate (from_pretrained); one line each in the plot."},
    )
    model_names: list[str] | None = field(
        default=None, metadata={"help": "Names in the table and legend, one per model path; default: folder names."}
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder; default: each model's."})
    results: list[str] | None = field(
        default=None, metadata={"help": "JSON reports of earlier runs to add to the table and plot."}
    )
    embedding_name: str | None = field(
        default=None, metadata={"help": "Embedding weight to attack; default: model.get_input_embeddings()."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; default: cuda when available."})
    # -- data -----------------------------------------------------------------------------------------------------
    dataset: str | None = field(
        default=None,
        metadata={"help": "A .csv/.tsv/.json/.jsonl file (optionally .gz) or a `save_to_disk` folder."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    label_column: str = field(
        default="label",
        metadata={
            "help": "Column with the label: a class id, or label ids (list or comma-separated) for multi-label."
        },
    )
    column_names: list[str] | None = field(
        default=None, metadata={"help": "Column names of a file without a header row (e.g. text label id)."}
    )
    num_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many examples, sampled with the seed; default: all."}
    )
    clean_br_tags: bool = field(
        default=True, metadata={"help": "Replace HTML line breaks (<br />) by spaces, as the recipes do."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    batch_size: int = field(default=32, metadata={"help": "Examples per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the example sample and of torch."})
    # -- attacks --------------------------------------------------------------------------------------------------
    attacks: list[str] = field(
        default_factory=lambda: list(ATTACKS), metadata={"help": "Any of fgm, pgd, min_perturbation, word."}
    )
    epsilons: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        metadata={"help": "FGM/PGD radii: L2 norm per example of the perturbation of the input embedding output."},
    )
    pgd_steps: int = field(default=5, metadata={"help": "PGD iterates K (the first is the FGM point)."})
    pgd_step_size: float | None = field(
        default=None, metadata={"help": "PGD step after the first, as a fraction of epsilon; default 2.5 / K."}
    )
    max_epsilon: float = field(default=4.0, metadata={"help": "Upper end of the minimal-perturbation bisection."})
    bisection_steps: int = field(default=8, metadata={"help": "Halvings of [0, max_epsilon]."})
    word_budget: float = field(
        default=0.1,
        metadata={"help": "Word attack: tokens changed per example, a fraction if < 1 (at least 1), else a count."},
    )
    word_neighbours: int = field(default=20, metadata={"help": "Word attack: nearest tokens tried per position."})
    # -- output ---------------------------------------------------------------------------------------------------
    output_dir: str = field(default="robustness", metadata={"help": "Where robustness.{json,md,png} are written."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.model_names is not None and len(self.model_names) != len(self.model_paths):
            raise ValueError(f"{len(self.model_names)} model_names for {len(self.model_paths)} model_paths.")
        if self.model_paths and self.dataset is None:
            raise ValueError("--dataset is needed to evaluate models.")
        if not self.model_paths and not self.results:
            raise ValueError("Nothing to do: pass --model_paths (with --dataset) and/or --results.")
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"Unknown attacks {unknown}; valid names are {list(ATTACKS)}.")

    def evaluator_kwargs(self) -> dict[str, Any]:
        return dict(
            epsilons=self.epsilons,
            attacks=self.attacks,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            max_epsilon=self.max_epsilon,
            bisection_steps=self.bisection_steps,
            word_budget=self.word_budget,
            word_neighbours=self.word_neighbours,
            embedding_name=self.embedding_name,
            seed=self.seed,
            disable_tqdm=self.disable_tqdm,
        )


def load_rows(args: RobustnessArguments) -> list[dict[str, Any]]:
    """The evaluation examples of `--dataset`, sampled with the seed when `--num_examples` is set."""
    import pandas as pd

    path = Path(args.dataset)
    if path.is_dir():
        from datasets import load_from_disk

        frame = load_from_disk(str(path)).to_pandas()
    else:
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = suffixes[-1] if suffixes else ".csv"
        header = {"header": None, "names": args.column_names} if args.column_names else {}
        if kind in (".tsv", ".txt"):
            frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, **header)
        elif kind == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif kind == ".json":
            frame = pd.read_json(path)
        else:
            frame = pd.read_csv(path, keep_default_na=False, **header)
    if args.num_examples is not None and args.num_examples < len(frame):
        frame = frame.sample(n=args.num_examples, random_state=args.seed)
    rows = frame.to_dict("records")
    if args.clean_br_tags:
        for row in rows:
            row[args.text_column] = re.sub(r"(\s*<br\s*/?>\s*)+", " ", str(row[args.text_column]), flags=re.IGNORECASE)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    from transformers import AutoTokenizer, HfArgumentParser

    parser = HfArgumentParser(RobustnessArguments, description=__doc__.split("\n\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = read_results(args.results or [])
    rows = load_rows(args) if args.model_paths else []
    names = args.model_names or [Path(p).name for p in args.model_paths]
    settings = {k: v for k, v in asdict(args).items() if k not in ("model_paths", "model_names", "results")}
    for name, path in zip(names, args.model_paths):
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or path)
        model = load_model(path, device)
        metrics = evaluate_robustness(
            model,
            rows,
            tokenizer,
            text_column=args.text_column,
            label_column=args.label_column,
            max_length=args.max_length,
            batch_size=args.batch_size,
            description=name,
            **args.evaluator_kwargs(),
        )
        problem_type = infer_problem_type(model.config, None)
        metrics["metric"] = "f1_micro" if problem_type == MULTI_LABEL else "accuracy"
        metrics["model"] = path
        metrics["settings"] = settings
        results[name] = metrics
        del model
    paths = write_report(results, args.output_dir)
    print(markdown_table(results))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def cli() -> None:
    """The `hf-adv-robustness` command (the same as `python -m hf_adv.robustness`)."""
    main()


if __name__ == "__main__":
    cli()
