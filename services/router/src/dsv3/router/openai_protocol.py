"""Request bodies of the OpenAI-compatible API, and its error objects.

Types are strict (a string where a number belongs is a 400, never coerced); fields OpenAI clients may
send that this server does not use are accepted and ignored, and features it does not implement
(n > 1, logprobs, echo, penalties, ...) are refused by name instead of silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Float = Annotated[float, Field(strict=True)]  # accepts JSON numbers (ints too), refuses strings


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, the offending parameter, a type and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """What completions and chat share: sampling, stopping, streaming."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: StrictInt | None = None  # extension (vLLM): 0 or absent = no limit
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False  # extension (vLLM): keep going past EOS
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None

    def check_supported(self) -> None:
        """Refuse, by field, what would otherwise be silently ignored or is out of range."""
        if self.n is not None and self.n != 1:
            raise bad_request("n", f"only n=1 is supported, got {self.n}")
        if self.temperature is not None and not self.temperature >= 0:
            raise bad_request("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_request("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise bad_request("top_k", f"must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(name, "penalties are not supported")
        if self.logit_bias:
            raise bad_request("logit_bias", "not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "only allowed with stream=true")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad_request("seed", "must fit in 64 bits")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise bad_request("stop", "stop sequences must not be empty")
        return stops


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo", "not supported")
        if self.logprobs is not None:
            raise bad_request("logprobs", "not supported")
        if self.best_of not in (None, 1):
            raise bad_request("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise bad_request("suffix", "not supported")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("prompt", "must not be empty")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None  # absent: the rest of the context
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages", "must not be empty")
        if self.logprobs:
            raise bad_request("logprobs", "not supported")
        if self.tools:
            raise bad_request("tools", "tool calls are not supported")

    def token_limit(self) -> tuple[str, int | None]:
        """(field, value) of the requested completion length; `max_completion_tokens` wins."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens
