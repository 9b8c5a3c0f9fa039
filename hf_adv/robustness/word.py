"""The word-substitution attack (Papernot et al., MILCOM 2016; Ebrahimi et al., "HotFlip", ACL 2018): greedily,
one token per step, the substitution with the largest first-order loss increase among the nearest tokens in the
model's own input embedding."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .core import select_rows

# Tokens whose nearest neighbours are searched at once (a chunk x vocabulary similarity matrix).
NEIGHBOUR_CHUNK = 512
# A tokenizer is taken for SentencePiece (word-start mark U+2581) or byte-level BPE (U+0120) when more than
# 1 / WORD_START_SHARE of its tokens start with the mark.
WORD_START_SHARE = 10


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


class WordSubstitution:
    """The word-substitution attack, for `RobustnessEvaluator`."""

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
        elif sum(t.startswith("\u2581") for t in present) > len(present) // WORD_START_SHARE:
            is_continuation = lambda t: not t.startswith("\u2581")  # noqa: E731  SentencePiece
        elif sum(t.startswith("\u0120") for t in present) > len(present) // WORD_START_SHARE:
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
            for chunk in missing.split(NEIGHBOUR_CHUNK):
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
            sub = {**select_rows(inputs, index), "input_ids": ids[index]}
            prediction = torch.empty_like(predictions[index])
            grad = torch.empty(0, *ids.shape[1:], self.hidden_size, device=self.device)
            if more.any():
                more_index = more.nonzero().squeeze(1)
                logits, (grad,) = self.logits_and_grads(
                    select_rows(sub, more_index), None, [labels[index[more_index]]]
                )
                prediction[more_index] = self.predict(logits)
            if not more.all():
                done_index = (~more).nonzero().squeeze(1)
                prediction[done_index] = self.predict(self.logits(select_rows(sub, done_index)))
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
