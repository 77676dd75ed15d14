"""The OpenAI wire format of responses and server-sent events."""

import json

from helios.api.protocol import EngineChunk
from helios.api.responses import ResponseShape, error_event
from helios.errors import EngineError, InvalidRequest


def _events(raw: bytes) -> list:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_full_completion_body() -> None:
    body = ResponseShape(False, "cmpl-1", 10, "m").full(EngineChunk("hi", [1, 2], "length", 3, 2))
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 10, "model": "m",
                    "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length", "token_ids": [1, 2]}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_full_chat_body_has_assistant_message() -> None:
    body = ResponseShape(True, "chatcmpl-1", 10, "m").full(EngineChunk("yo", None, "stop", 1, 1))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "yo"}
    assert "token_ids" not in body["choices"][0]


def test_chat_stream_opens_with_role_then_content_then_usage_and_done() -> None:
    shape = ResponseShape(True, "c", 1, "m")
    raw = shape.event(EngineChunk("a", None, None, 4, 1), first=True)
    raw += shape.event(EngineChunk("bc", None, "length", 4, 3), first=False)
    raw += shape.closing(EngineChunk("bc", None, "length", 4, 3), include_usage=True)
    first, second, usage, done = _events(raw)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert second["choices"][0]["delta"] == {"content": "bc"} and second["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert done == "[DONE]"


def test_stream_without_usage_ends_with_done_only() -> None:
    assert ResponseShape(False, "c", 1, "m").closing(None, include_usage=True) == b"data: [DONE]\n\n"


def test_non_ascii_text_survives_the_event_encoding() -> None:
    (event,) = _events(ResponseShape(False, "c", 1, "m").event(EngineChunk("wörld 🙂\n\n", None, None, 1, 1), True))
    assert event["choices"][0]["text"] == "wörld 🙂\n\n"


def test_server_errors_hide_their_text_client_errors_show_it() -> None:
    hidden = EngineError("segfault in kernel at 0xdead").to_body("req-9")["error"]
    assert "segfault" not in hidden["message"] and "req-9" in hidden["message"]
    shown = InvalidRequest("bad top_p", param="top_p").to_body("r")["error"]
    assert shown == {"message": "bad top_p", "type": "invalid_request_error", "param": "top_p", "code": None}
    assert _events(error_event(hidden and {"error": hidden}))[-1] == "[DONE]"


def test_errors_survive_pickling_across_ray() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(InvalidRequest("x", param="p")))
    assert isinstance(err, InvalidRequest) and err.param == "p" and err.status_code == 400
