"""OpenAI response bodies and server-sent events, built from engine chunks.

Pure functions of their inputs, so the wire format is tested without Ray or an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from helios.api.protocol import EngineChunk

_DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def usage(chunk: EngineChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class ResponseShape:
    """Which endpoint a response belongs to, with the fields every chunk repeats."""

    chat: bool
    response_id: str
    created: int
    model: str

    def _envelope(self, choices: list[dict], streaming: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, chunk: EngineChunk) -> dict[str, Any]:
        """The non-streamed response body."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": chunk.text}}
        else:
            choice = {"index": 0, "text": chunk.text}
        choice.update(logprobs=None, finish_reason=chunk.finish_reason)
        if chunk.token_ids is not None:
            choice["token_ids"] = chunk.token_ids
        body = self._envelope([choice], streaming=False)
        body["usage"] = usage(chunk)
        return body

    def event(self, chunk: EngineChunk, first: bool) -> bytes:
        """One SSE event for a coalesced chunk (the chat stream opens with the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": chunk.text}
        choice.update(logprobs=None, finish_reason=chunk.finish_reason)
        if chunk.token_ids is not None:
            choice["token_ids"] = chunk.token_ids
        return b"data: " + _dumps(self._envelope([choice], streaming=True)).encode() + b"\n\n"

    def closing(self, last: EngineChunk | None, include_usage: bool) -> bytes:
        """The usage event (when asked for) and `[DONE]`."""
        if not include_usage or last is None:
            return _DONE
        body = self._envelope([], streaming=True)
        body["usage"] = usage(last)
        return b"data: " + _dumps(body).encode() + b"\n\n" + _DONE


def error_event(body: dict[str, Any]) -> bytes:
    """An error that happens after the stream's 200 was sent goes in-band, then `[DONE]`."""
    return b"data: " + _dumps(body).encode() + b"\n\n" + _DONE
