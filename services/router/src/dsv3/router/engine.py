"""Continuous batching: requests join and leave between decode steps; one forward per step for all.

Each loop iteration prefills every waiting request that has a free cache slot in one batched forward
(their first token), then runs one decode forward for every active request. The model runs on the
single model thread (`executor`), so a step and a `Forward` never overlap; the loop itself stays free
to serve RPCs and to run the shard fan-out that the step's MoE layers hand to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import torch

from dsv3.model import DeepSeekV3
from dsv3.router import tracing
from dsv3.router.batched import SlotCache, step
from dsv3.serving import threads

log = logging.getLogger(__name__)


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past the tokenizer's EOS (vLLM's flag; benchmarks use it)


class RequestError(ValueError):
    """A request that cannot be served as asked; `field` names the culprit (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_DONE = object()


@dataclasses.dataclass(frozen=True)
class Emitted:
    """One new token as the engine hands it out; `last` marks the request's final token."""

    token: int
    last: bool


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    generated: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1
    cancelled: bool = False
    generator: torch.Generator | None = None
    draft: object = None  # speculative.Draft: the MTP's guess of the token after generated[-1]
    finish_reason: str | None = None  # "stop" (EOS or a stop token) or "length", once finished
    drafted: int = 0  # MTP draft tokens the main model verified for this request
    accepted: int = 0  # ... and accepted
    trace: object = None  # the trace context it was submitted in (tracing.current())

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)


def sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus), then a draw."""
    if params.temperature == 0:
        return int(logits_V.float().cpu().argmax())
    return int(torch.multinomial(probabilities(logits_V, params), 1, generator=generator))


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """`sample` for each row; the greedy rows through one argmax for the whole batch."""
    greedy = logits_BV.argmax(-1).tolist() if any(p.temperature == 0 for p in params) else []
    return [
        greedy[b] if p.temperature == 0 else sample(logits_BV[b], p, generators[b])
        for b, p in enumerate(params)
    ]


def probabilities(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a draw at temperature > 0 follows (float32, CPU): temperature, top-k, top-p."""
    logits = logits_V.float().cpu() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each
        sorted_probs[before >= params.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


class Engine:
    def __init__(
        self,
        model: DeepSeekV3,
        max_batch: int,
        max_length: int,
        executor: Executor,
        eos_id: int | None = None,
        speculative: bool = False,
        decode_threads: int = 0,
    ) -> None:
        """`eos_id`: the tokenizer's end of sequence; sampling it ends a request unless `ignore_eos`.
        `speculative`: decode with MTP drafts (`speculative.py`) when the model has MTP layers.
        `decode_threads`: torch intra-op threads of a decode step (0: as many as a prefill gets)."""
        self.model = model
        self.eos_id = eos_id
        self.max_length = max_length
        self.vocab = model.config.vocab_size
        mtp = speculative and len(model.mtp) > 0
        self.cache = SlotCache(model, max_batch, max_length, mtp_layers=1 if mtp else 0)
        self.speculator = None
        if mtp:
            from dsv3.router.speculative import Speculator  # it imports this module's sampling

            self.speculator = Speculator(model, self.cache)
        self.executor = executor
        self.decode_threads = decode_threads
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self.wake = asyncio.Event()
        self.steps = 0  # decode forwards run (one per step, whatever the batch)
        self.drafted = 0  # MTP drafts verified, over every request (speculative decoding)
        self.accepted = 0
        self.decode_seconds = 0.0  # model-thread time of the decode steps (with their MTP drafts)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise RequestError("prompt_ids", "must not be empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise RequestError("prompt_ids", f"token {bad[0]} outside the vocabulary [0, {self.vocab})")
        if params.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be > 0, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_length:
            raise RequestError(
                "max_tokens",
                f"{len(prompt)} prompt + {params.max_tokens} new tokens exceed the context "
                f"of {self.max_length}",
            )
        if not params.temperature >= 0:
            raise RequestError("temperature", f"must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise RequestError("top_k", f"must be >= 0, got {params.top_k}")

    def submit(self, prompt: list[int], params: SamplingParams, trace: object = None) -> Request:
        """Queue a request; `trace`: the trace context it belongs to (default: the caller's current)."""
        self.validate(prompt, params)
        request = Request(list(prompt), params, trace=trace if trace is not None else tracing.current())
        self.waiting.append(request)
        self.wake.set()
        return request

    def _emit(self, request: Request, token: int) -> bool:
        """Hand the token out; True when the request is finished."""
        request.generated.append(token)
        params = request.params
        if token in params.stop or (token == self.eos_id and not params.ignore_eos):
            request.finish_reason = "stop"
        elif len(request.generated) >= params.max_tokens:
            request.finish_reason = "length"
        done = request.finish_reason is not None
        request.queue.put_nowait(Emitted(token, done))
        if done:
            request.queue.put_nowait(_DONE)
        return done

    def _finish(self, request: Request) -> None:
        if request.slot >= 0:
            self.cache.release(request.slot)
            request.slot = -1
        if request in self.active:
            self.active.remove(request)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        for request in requests:
            request.queue.put_nowait(exc)
            self._finish(request)

    def _sample_all(self, logits_BV: torch.Tensor, requests: list[Request]) -> list[int]:
        return sample_rows(logits_BV, [r.params for r in requests], [r.generator for r in requests])

    async def _in_model_thread(
        self, name: str, requests: list[Request], work: Callable[[], T], decoding: bool = False
    ) -> T:
        """Run `work` on the model thread, as a span of the requests' traces when tracing is on; a
        decode step with `decode_threads` intra-op threads, a prefill with all of them."""
        work = threads.running_with(self.decode_threads if decoding else 0, work)
        traced = tracing.in_step(
            name, [r.trace for r in requests if r.trace is not None], len(requests), work
        )
        return await asyncio.get_running_loop().run_in_executor(self.executor, traced)

    async def _run_step(
        self, requests: list[Request], token_lists: list[list[int]], decoding: bool
    ) -> list[int]:
        def work() -> list[int]:
            logits = step(self.model, self.cache, [r.slot for r in requests], token_lists)
            return self._sample_all(logits, requests)

        return await self._in_model_thread("router.step", requests, work, decoding)

    async def _prefill(self, requests: list[Request]) -> list[int]:
        """Every joining prompt's first token (and, speculating, its first draft)."""
        if self.speculator is None:
            return await self._run_step(requests, [r.prompt for r in requests], decoding=False)
        speculator = self.speculator

        def work() -> list[int]:
            out = speculator.prefill(
                [r.slot for r in requests],
                [r.prompt for r in requests],
                [r.params for r in requests],
                [r.generator for r in requests],
            )
            for request, (_, draft) in zip(requests, out, strict=True):
                request.draft = draft
            return [token for token, _ in out]

        return await self._in_model_thread("router.prefill", requests, work)

    async def _decode(self, requests: list[Request]) -> list[list[int]]:
        """The tokens each request gains this step: one, or with an accepted draft two."""
        started = time.perf_counter()
        try:
            return await self._decode_tokens(requests)
        finally:
            self.decode_seconds += time.perf_counter() - started

    async def _decode_tokens(self, requests: list[Request]) -> list[list[int]]:
        if self.speculator is None:
            tokens = await self._run_step(requests, [[r.generated[-1]] for r in requests], decoding=True)
            return [[t] for t in tokens]
        from dsv3.router.speculative import Row

        speculator = self.speculator
        rows = [
            Row(
                r.slot,
                r.params,
                r.generator,
                r.generated[-1],
                r.draft,
                r.params.max_tokens - len(r.generated),
            )
            for r in requests
        ]

        def work():
            return speculator.decode(rows)

        outcomes = await self._in_model_thread("router.decode", requests, work, decoding=True)
        for request, outcome in zip(requests, outcomes, strict=True):
            request.draft = outcome.draft
            request.drafted += outcome.drafted
            request.accepted += outcome.accepted
            self.drafted += outcome.drafted
            self.accepted += outcome.accepted
        return [o.tokens for o in outcomes]

    async def run(self) -> None:
        while True:
            for request in [r for r in self.active if r.cancelled]:
                self._finish(request)
            self.waiting = [r for r in self.waiting if not r.cancelled]
            if not self.waiting and not self.active:
                self.wake.clear()
                await self.wake.wait()
                continue
            joining = self.waiting[: len(self.cache.free)]
            self.waiting = self.waiting[len(joining) :]
            if joining:
                for request in joining:
                    request.slot = self.cache.take()
                try:
                    tokens = await self._prefill(joining)
                except Exception as exc:
                    log.warning("prefill failed: %s", exc)
                    self._fail(joining, exc)
                    continue
                for request, token in zip(joining, tokens, strict=True):
                    if self._emit(request, token):
                        self._finish(request)
                    else:
                        self.active.append(request)
            decoding = [r for r in self.active if not r.cancelled]
            if not decoding:
                continue
            try:
                gained = await self._decode(decoding)
            except Exception as exc:
                log.warning("decode step failed: %s", exc)
                self._fail(decoding, exc)
                continue
            self.steps += 1
            for request, tokens in zip(decoding, gained, strict=True):
                for token in tokens:
                    if self._emit(request, token):
                        self._finish(request)
                        break

    @staticmethod
    async def events(request: Request):
        """The request's `Emitted` tokens as they come; raises what failed it."""
        while True:
            item = await request.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @staticmethod
    async def tokens(request: Request):
        """The request's token ids as they come; raises what failed it."""
        async for item in Engine.events(request):
            yield item.token
