"""OpenAI request bodies, validated at the edge, and the compact request sent to an engine.

Only what Helios honours is declared; unknown fields that OpenAI clients send (`user`,
`metadata`, ...) are ignored, as OpenAI-compatible servers do, while a known field with a
bad value is a 400 naming that field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from helios.errors import InvalidRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by both endpoints, mapped one to one onto vLLM's SamplingParams."""

    model: str = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = Field(False, description="vLLM extension: include the generated token ids.")
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be at most 16 non-empty strings")
        return stops

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The SamplingParams keyword arguments this request sets (unset ones keep vLLM's defaults)."""
        if self.logprobs not in (None, False):
            raise InvalidRequest("logprobs are not supported yet", param="logprobs")
        keys = (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed", "stop", "stop_token_ids",
        )
        params: dict[str, Any] = {k: v for k in keys if (v := getattr(self, k)) is not None}
        params.update(
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> str | list[int]:
        # A list of prompts is a batch; Helios serves one prompt per request.
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("send one prompt per request (batched prompts are not supported)")
            value = value[0]
        if isinstance(value, (str, list)) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be non-negative")
        return value

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


@dataclass(slots=True)
class EngineRequest:
    """What the router sends an engine replica: small, plain and cheap to pickle."""

    request_id: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    return_token_ids: bool = False
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated serving: where the prompt's KV is (or goes)


@dataclass(slots=True)
class EngineChunk:
    """A run of new tokens from one request, coalesced; the last carries `finish_reason`."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    kv_transfer_params: dict[str, Any] | None = None  # on the last chunk of a prefill: where its KV blocks are
