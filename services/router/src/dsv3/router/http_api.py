"""The OpenAI-compatible HTTP API of the router, on FastAPI + uvicorn in the router's own event loop.

`/v1/completions`, `/v1/chat/completions` (JSON or server-sent events ending in `data: [DONE]`),
`/v1/models`, `/health`, `/metrics`. A request becomes one engine request per prompt, in the same
continuous batch as gRPC `Generate`; text is decoded incrementally (`TextStream`) so stop sequences end
a generation as soon as they appear. Every failure is an OpenAI-style error object: 400 naming the
field, 404 for an unknown model or path, 503 while no replica can serve, 500 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.router.engine import Engine, RequestError, SamplingParams
from dsv3.router.engine import Request as EngineRequest
from dsv3.router.metrics import RouterMetrics
from dsv3.router.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    bad_request,
)
from dsv3.router.pool import ExpertUnavailable
from dsv3.router.text_stream import TextStream
from dsv3.tokenizer import ChatTemplateError, Tokenizer, encode_prompt, render_chat

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServedModel:
    """What the API serves: one model under one name, through one engine."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    unavailable: Callable[[], str | None]  # why no replica can serve now, or None when it can
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class _Choice:
    index: int
    job: EngineRequest
    text: TextStream
    prompt_tokens: int


def _param_of(loc: tuple[Any, ...]) -> str:
    """pydantic's error location (('body', 'messages', 0, 'content'), ...) as `messages[0].content`."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "list[int]", "list[str]", "list[list[int]]") or "[" in str(part):
            continue  # the union member pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"body: malformed JSON: {first.get('ctx', {}).get('error', '')}", "body")
    param = _param_of(tuple(first.get("loc", ("body",))))
    if first.get("type") == "missing":
        return bad_request(param, "is required")
    return bad_request(param, f"{first.get('msg', 'invalid')} (got {first.get('input')!r})"[:300])


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(len(c.text.ids) for c in choices)
    drafted = sum(c.job.drafted for c in choices)
    accepted = sum(c.job.accepted for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's fields for predicted tokens: here the MTP drafts the main model accepted / rejected
        "completion_tokens_details": {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        },
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _API:
    def __init__(self, served: ServedModel, metrics: RouterMetrics) -> None:
        self.served = served
        self.metrics = metrics

    # ---- shared request handling --------------------------------------------------------------
    def _check_servable(self, body: SamplingRequest) -> None:
        if body.model is not None and body.model != self.served.name:
            raise APIError(
                404,
                f"model: {body.model!r} is not served here (serving {self.served.name!r})",
                "model",
                code="model_not_found",
            )
        reason = self.served.unavailable()
        if reason:
            raise APIError(
                503, f"no replica can serve: {reason}", type="unavailable_error", code="no_replica"
            )

    def _submit(
        self,
        body: SamplingRequest,
        prompts: list[list[int]],
        prompt_field: str,
        limit: tuple[str, int | None],
    ) -> list[_Choice]:
        engine, tokenizer = self.served.engine, self.served.tokenizer
        limit_field, max_tokens = limit
        stops = body.stop_strings()
        planned: list[tuple[list[int], SamplingParams]] = []
        for ids in prompts:
            if len(ids) >= engine.max_length:
                raise bad_request(
                    prompt_field,
                    f"{len(ids)} tokens leave no room for new ones in the context of {engine.max_length}",
                )
            wanted = engine.max_length - len(ids) if max_tokens is None else max_tokens
            if wanted <= 0:
                raise bad_request(limit_field, f"must be > 0, got {wanted}")
            params = SamplingParams(
                max_tokens=wanted,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                seed=body.seed,
                ignore_eos=bool(body.ignore_eos),
            )
            try:
                engine.validate(ids, params)
            except RequestError as exc:
                field = {"prompt_ids": prompt_field, "max_tokens": limit_field}.get(exc.field, exc.field)
                raise bad_request(field, str(exc).split(": ", 1)[-1]) from None
            planned.append((ids, params))
        choices = []
        for index, (ids, params) in enumerate(planned):  # all valid: submit together
            job = engine.submit(ids, params)
            choices.append(_Choice(index, job, TextStream(tokenizer, stops), len(ids)))
            self.metrics.prompt_tokens.inc(len(ids))
        return choices

    async def _deltas(self, choice: _Choice, started: float) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None) of one choice; cancels the engine request when left."""
        first = True
        try:
            async for event in self.served.engine.events(choice.job):
                if first:
                    self.metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                self.metrics.generation_tokens.inc()
                delta = choice.text.feed(event.token)
                if choice.text.stopped:
                    yield delta, "stop"
                    return
                if event.last:
                    yield delta + choice.text.flush(), choice.job.finish_reason or "length"
                    return
                if delta:
                    yield delta, None
        finally:
            choice.job.cancelled = True  # a stop sequence or a client that left frees the slot

    async def _collect(self, choice: _Choice, started: float) -> tuple[str, str]:
        text, reason = "", "length"
        async for delta, finish in self._deltas(choice, started):
            text += delta
            reason = finish or reason
        return text, reason

    async def _merged(
        self, choices: list[_Choice], started: float
    ) -> AsyncIterator[tuple[_Choice, str, str | None]]:
        """Every choice's deltas as they come, interleaved."""
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(choice: _Choice) -> None:
            try:
                async for delta, finish in self._deltas(choice, started):
                    await queue.put((choice, delta, finish))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(end)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is end:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for choice in choices:
                choice.job.cancelled = True

    @staticmethod
    def _failure(exc: BaseException) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ExpertUnavailable):
            return APIError(503, f"no replica can serve: {exc}", type="unavailable_error", code="no_replica")
        log.exception("generation failed", exc_info=exc)
        return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")

    async def _respond(
        self,
        body: SamplingRequest,
        choices: list[_Choice],
        started: float,
        kind: str,
        shape: Callable[[int, str, str | None, bool], dict[str, Any]],
    ) -> Response:
        """JSON with every choice, or an SSE stream of chunks; `shape` makes one choice's object."""
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": ident, "created": int(time.time()), "model": self.served.name}
        if not body.stream:
            try:
                results = await asyncio.gather(*(self._collect(c, started) for c in choices))
            except Exception as exc:
                for choice in choices:
                    choice.job.cancelled = True
                raise self._failure(exc) from exc
            return JSONResponse(
                {
                    **head,
                    "object": obj,
                    "choices": [
                        shape(c.index, t, r, False) for c, (t, r) in zip(choices, results, strict=True)
                    ],
                    "usage": _usage(choices),
                }
            )
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            if kind == "chat":  # OpenAI opens each chat choice with the role
                for c in choices:
                    first = {"index": c.index, "delta": {"role": "assistant", "content": ""}}
                    yield _sse({**head, "object": chunk_obj, "choices": [{**first, "finish_reason": None}]})
            try:
                async for choice, delta, finish in self._merged(choices, started):
                    if delta or finish:
                        chunk = {
                            **head,
                            "object": chunk_obj,
                            "choices": [shape(choice.index, delta, finish, True)],
                        }
                        yield _sse(chunk)
            except Exception as exc:
                yield _sse(self._failure(exc).body())
                yield _sse("[DONE]")
                return
            if include_usage:
                yield _sse({**head, "object": chunk_obj, "choices": [], "usage": _usage(choices)})
            yield _sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ---- endpoints ----------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest) -> Response:
        started = time.perf_counter()
        self._check_servable(body)
        body.check_supported()
        prompts = [
            encode_prompt(self.served.tokenizer, p) if isinstance(p, str) else p for p in body.prompts()
        ]
        if any(not p for p in prompts):
            raise bad_request("prompt", "encodes to no tokens")
        choices = self._submit(body, prompts, "prompt", ("max_tokens", body.max_tokens))

        def shape(index: int, text: str, finish: str | None, chunk: bool) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        return await self._respond(body, choices, started, "text", shape)

    async def chat(self, body: ChatCompletionRequest) -> Response:
        started = time.perf_counter()
        self._check_servable(body)
        body.check_supported()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = render_chat(self.served.tokenizer, messages)
        except ChatTemplateError as exc:
            raise bad_request("messages", str(exc)) from None
        ids = encode_prompt(self.served.tokenizer, text)
        if not ids:
            raise bad_request("messages", "render to an empty prompt")
        choices = self._submit(body, [ids], "messages", body.token_limit())

        def shape(index: int, text: str, finish: str | None, chunk: bool) -> dict[str, Any]:
            if chunk:
                return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}

        return await self._respond(body, choices, started, "chat", shape)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.served.name:
            raise APIError(404, f"model: {model_id!r} is not served here", "model", code="model_not_found")
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.served.name,
            "object": "model",
            "created": self.served.created,
            "owned_by": "dsv3",
            "max_model_len": self.served.engine.max_length,
        }


def create_app(served: ServedModel, metrics: RouterMetrics) -> FastAPI:
    api = _API(served, metrics)
    app = FastAPI(title="dsv3 router", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)  # FastAPI's own OpenTelemetry makes the request's span
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat)
    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model_id}")(api.model)

    @app.get("/health")
    async def health() -> Response:
        reason = served.unavailable()
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        # The router's own registry, then the process-wide one: OpenTelemetry's instruments (dispatch
        # time per MoE layer) and the process metrics.
        body = generate_latest(metrics.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the router's gRPC bootstrap owns SIGTERM and drains both."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(app: FastAPI, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task]:
    """Listen on host:port in the running event loop; returns the server (set `should_exit`) and its task."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start (e.g. the port is taken)
            raise OSError(f"HTTP API could not listen on {host}:{port}")
        await asyncio.sleep(0.01)
    return server, task
