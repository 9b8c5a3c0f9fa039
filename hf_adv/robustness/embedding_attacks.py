"""Embedding-space attacks of the evaluation: FGM and PGD over an epsilon grid (Madry et al., ICLR 2018), and the
minimal perturbation by bisection (Papernot et al., IEEE S&P 2016). The PGD step and the per-example L2 ball are the
ones example-scope training uses (`hf_adv.embedding.ascent_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..embedding import ascent_step, normalize_per_example
from ..losses import SINGLE_LABEL
from .core import epsilon_key, select_rows

# The bisection stops once upper - lower is within its precision; this slack keeps float rounding of the halved
# bracket from costing one more PGD round.
BISECTION_SLACK = 1 + 1e-6


class EmbeddingAttacks:
    """FGM, PGD and the minimal perturbation on the embedding output, for `RobustnessEvaluator`."""

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
            sub = select_rows(inputs, index)
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
            (delta,) = ascent_step([delta], [normalize_per_example(grad * mask[index])], alpha, epsilon[index])
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
        precision = self.max_epsilon / 2**self.bisection_steps * BISECTION_SLACK
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
                    fgm[rest] = self.predict(self.logits(select_rows(inputs, rest), point))
                rows[f"fgm@{key}"] = self.counts(fgm, labels)
        if bracketed is None:
            return rows, None
        lower = torch.where(bracketed, lower, 0.0)
        upper = torch.where(bracketed, upper, math.inf)
        return rows, (lower, upper)
