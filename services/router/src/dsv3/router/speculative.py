"""MTP speculative decoding inside the continuous batch: one draft token per request and step.

A request carries its last sampled token x (at position n, not yet in the cache) and a draft d of the
token after it. Each step, for every request at once:
1. the main model runs over [x, d] (positions n, n+1), giving the target distributions p_n, p_{n+1};
2. the draft is verified (`accept_draft`): accepted, the request gains d and a token drawn from
   p_{n+1}; rejected, it gains one token drawn from the residual, and the cache entry of d is rolled
   back (the row's length drops to n+1, so it is masked and later overwritten);
3. the MTP module drafts the next token, as in DeepSeek-V3's MTP chain: at position i it combines the
   main model's final hidden state h_i with the embedding of token i+1 and predicts token i+2. It runs
   over the positions the request just gained (1 or 2, different per request), on its own cache layer,
   which so stays as long as the main layers'.
After the prompt's forward the MTP module runs over every prompt position (the first draft).
Acceptance is the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept
d with probability min(1, p(d)/q(d)), else draw from max(0, p - q) normalised; the output then follows
the target distribution exactly. At temperature 0 it reduces to "accept when d is the argmax", so
greedy output equals non-speculative greedy token for token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from dsv3.model import DeepSeekV3
from dsv3.router import batched
from dsv3.router.batched import SlotCache
from dsv3.router.engine import SamplingParams, probabilities, sample, sample_rows


@dataclasses.dataclass(frozen=True)
class Draft:
    token: int
    probs_V: torch.Tensor | None  # the distribution it was drawn from (q); None when greedy


def propose(
    logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, best: int | None = None
) -> Draft:
    """A draft token from the MTP logits, drawn as the target would be (same temperature, top-k, top-p);
    `best`: the argmax when the caller has it (one argmax for the whole batch)."""
    if params.temperature == 0:
        return Draft(int(logits_V.float().cpu().argmax()) if best is None else best, None)
    q_V = probabilities(logits_V, params)
    q_V = q_V / q_V.sum()
    return Draft(int(torch.multinomial(q_V, 1, generator=generator)), q_V)


def accept_draft(
    target_logits_V: torch.Tensor,
    draft: Draft,
    params: SamplingParams,
    generator: torch.Generator | None,
    best: int | None = None,
) -> tuple[bool, int]:
    """(accepted, token at the draft's position): the draft itself, or the replacement for it; `best`:
    the target's argmax when the caller has it."""
    if params.temperature == 0 or draft.probs_V is None:
        best = int(target_logits_V.float().cpu().argmax()) if best is None else best
        return best == draft.token, best
    p_V = probabilities(target_logits_V, params)
    p_V = p_V / p_V.sum()
    q_V = draft.probs_V
    ratio = float(p_V[draft.token]) / float(q_V[draft.token])
    if float(torch.rand((), generator=generator)) < ratio:
        return True, draft.token
    residual_V = (p_V - q_V).clamp_min(0)
    if float(residual_V.sum()) <= 0:  # p == q up to rounding: any draw from p is right
        residual_V = p_V
    return False, int(torch.multinomial(residual_V, 1, generator=generator))


AcceptRule = Callable[..., tuple[bool, int]]  # (target logits, draft, params, generator, best=None)


@dataclasses.dataclass
class Row:
    """What the speculator needs of one request: its slot, sampling, randomness, and tokens so far."""

    slot: int
    params: SamplingParams
    generator: torch.Generator | None
    pending: int  # the last sampled token, not yet in the cache
    draft: Draft | None
    remaining: int  # tokens the request may still emit


@dataclasses.dataclass
class Outcome:
    tokens: list[int]  # emitted this step, in order
    draft: Draft  # for the next step
    drafted: bool  # a draft was verified this step ...
    accepted: bool  # ... and accepted


class Speculator:
    """Runs the prefill and decode forwards of a continuous batch with MTP drafts (in the model thread)."""

    def __init__(self, model: DeepSeekV3, cache: SlotCache, accept: AcceptRule = accept_draft) -> None:
        if not len(model.mtp):
            raise ValueError("speculative decoding needs a checkpoint with MTP layers")
        self.model = model
        self.cache = cache
        self.accept = accept
        self.mtp_seconds = 0.0  # time in the MTP drafts of decode steps: r = its share per step

    def _logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden_BTD)

    @staticmethod
    def _sample(logits_V: torch.Tensor, row: Row, best: int) -> int:
        return best if row.params.temperature == 0 else sample(logits_V, row.params, row.generator)

    @torch.no_grad()
    def prefill(
        self, slots: list[int], prompts: list[list[int]], params: list[SamplingParams], generators: list
    ) -> list[tuple[int, Draft]]:
        """Each prompt's first token and the draft of the one after it."""
        hidden = batched.forward(self.model, self.cache, slots, prompts)
        lengths = [len(p) for p in prompts]
        last = hidden[torch.arange(len(slots)), torch.tensor(lengths) - 1]
        logits = self._logits(last)
        firsts = sample_rows(logits, params, generators)
        following = [[*p[1:], t] for p, t in zip(prompts, firsts, strict=True)]
        mtp_logits = batched.mtp_step(self.model, self.cache, slots, [0] * len(slots), hidden, following)
        best = mtp_logits.argmax(-1).tolist()
        drafts = [propose(mtp_logits[b], params[b], generators[b], best[b]) for b in range(len(slots))]
        return list(zip(firsts, drafts, strict=True))

    @torch.no_grad()
    def decode(self, rows: list[Row]) -> list[Outcome]:
        """One step: verify every row's draft, keep what is accepted, roll back the rest, draft anew."""
        cache, slots = self.cache, [r.slot for r in rows]
        starts = [cache.lengths[s] for s in slots]
        use = [r.draft is not None and r.remaining >= 2 for r in rows]  # a last token gains nothing
        inputs = [[r.pending, r.draft.token] if u else [r.pending] for r, u in zip(rows, use, strict=True)]
        hidden = batched.forward(self.model, cache, slots, inputs)
        logits = self._logits(hidden)
        best_BT = logits.argmax(-1).tolist()  # greedy rows: one argmax for the batch
        emitted: list[list[int]] = []
        accepted: list[bool] = []
        for b, row in enumerate(rows):
            if use[b]:
                ok, token = self.accept(logits[b, 0], row.draft, row.params, row.generator, best_BT[b][0])
                tokens = [token, self._sample(logits[b, 1], row, best_BT[b][1])] if ok else [token]
            else:
                ok, tokens = False, [self._sample(logits[b, 0], row, best_BT[b][0])]
            cache.lengths[row.slot] = starts[b] + len(tokens)  # a rejected draft's entry rolls back
            emitted.append(tokens)
            accepted.append(ok)
        started = time.perf_counter()
        mtp_logits = batched.mtp_step(self.model, cache, slots, starts, hidden, emitted)
        self.mtp_seconds += time.perf_counter() - started
        best = mtp_logits.argmax(-1).tolist()
        return [
            Outcome(tokens, propose(mtp_logits[b], row.params, row.generator, best[b]), use[b], accepted[b])
            for b, (row, tokens) in enumerate(zip(rows, emitted, strict=True))
        ]
