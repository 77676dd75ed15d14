"""RouterCore without Ray: a fake engine (named as one) stands in for the Serve handles."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.errors import AuthenticationFailed, EngineUnavailable, InvalidRequest, ModelNotFound, ServiceUnavailable
from helios.router.core import EngineClient, EngineStream, ModelRoute, RetryPolicy, RouterCore

JSON = [("content-type", "application/json")]


class FakeStream(EngineStream):
    def __init__(self, head: EngineHTTPResponse, chunks: list[bytes]) -> None:
        self.head, self.chunks, self.cancelled = head, chunks, False

    async def first(self) -> EngineHTTPResponse:
        return self.head

    async def rest(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine(EngineClient):
    """Answers from a script and records what it was sent."""

    def __init__(self, status: int = 200, body: bytes = b'{"ok":true}', chunks: list[bytes] | None = None) -> None:
        self.status, self.body, self.chunks = status, body, chunks or []
        self.seen: list[EngineHTTPRequest] = []
        self.streams: list[FakeStream] = []

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        self.seen.append(req)
        return EngineHTTPResponse(self.status, JSON, self.body)

    def stream(self, req: EngineHTTPRequest) -> EngineStream:
        self.seen.append(req)
        s = FakeStream(EngineHTTPResponse(self.status, [("content-type", "text/event-stream")], self.body), self.chunks)
        self.streams.append(s)
        return s


def run(coro):
    return asyncio.run(coro)


def test_forwards_the_raw_body_and_only_the_headers_vllm_reads() -> None:
    engine = FakeEngine()
    core = RouterCore({"m": ModelRoute(engine)})
    raw = b'{"model": "m",   "prompt": "hi", "tools": [], "weird_field": {"x": 1}}'
    headers = {"content-type": "application/json", "authorization": "Bearer k", "cookie": "c", "traceparent": "00-a"}
    resp = run(core.forward("/v1/completions", headers, raw, "rid"))
    assert resp.status == 200 and resp.body == b'{"ok":true}'
    (sent,) = engine.seen
    assert sent.body == raw  # byte for byte: the router does not re-encode
    assert dict(sent.headers) == {"content-type": "application/json", "traceparent": "00-a", "x-request-id": "rid"}
    assert resp.headers["x-request-id"] == "rid"


def test_api_keys() -> None:
    core = RouterCore({"m": ModelRoute(FakeEngine())}, api_keys=[b"secret"])
    with pytest.raises(AuthenticationFailed):
        core.authorize({})
    with pytest.raises(AuthenticationFailed):
        core.authorize({"authorization": "Bearer wrong"})
    core.authorize({"authorization": "Bearer secret"})
    RouterCore({"m": ModelRoute(FakeEngine())}).authorize({})  # no keys: open


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"", b"\xff"])
def test_malformed_bodies_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        run(RouterCore({"m": ModelRoute(FakeEngine())}).forward("/v1/completions", {}, raw, "r"))


def test_model_lookup_uses_the_resolver_then_404() -> None:
    other = FakeEngine(body=b'{"from":"resolver"}')
    asked: list[str] = []
    used: list[str] = []

    async def resolver(model: str) -> ModelRoute | None:
        asked.append(model)
        return ModelRoute(other) if model == "dyn" else None

    core = RouterCore({"m": ModelRoute(FakeEngine()), "n": ModelRoute(FakeEngine())}, resolver=resolver,
                      on_use=used.append)
    assert run(core.forward("/v1/completions", {}, b'{"model":"dyn"}', "r")).body == b'{"from":"resolver"}'
    with pytest.raises(ModelNotFound):
        run(core.forward("/v1/completions", {}, b'{"model":"nope"}', "r"))
    with pytest.raises(InvalidRequest):  # two models: `model` is required
        run(core.forward("/v1/completions", {}, b'{"prompt":"x"}', "r"))
    assert asked == ["dyn", "nope"] and used == ["dyn"]


def test_one_model_may_be_left_out() -> None:
    engine = FakeEngine()
    run(RouterCore({"m": ModelRoute(engine)}).forward("/v1/completions", {}, b'{"prompt":"x"}', "r"))
    assert len(engine.seen) == 1


def test_server_errors_show_only_the_request_id() -> None:
    engine = FakeEngine(status=500, body=b'{"error":{"message":"secret stack trace"}}')
    resp = run(RouterCore({"m": ModelRoute(engine)}).forward("/v1/completions", {}, b'{"model":"m"}', "rid-9"))
    assert resp.status == 500
    assert b"secret" not in resp.body and b"rid-9" in resp.body


def test_stream_relays_bytes_unchanged() -> None:
    chunks = [b'data: {"a":1}\n\n', b'data: {"a":2}\n\ndata: [DONE]\n\n']
    engine = FakeEngine(body=b'data: {"a":0}\n\n', chunks=chunks)
    core = RouterCore({"m": ModelRoute(engine)})

    async def go() -> tuple[int, list[bytes]]:
        resp = await core.forward("/v1/completions", {}, b'{"model":"m","stream":true}', "r")
        return resp.status, [c async for c in resp.stream]

    status, got = run(go())
    assert status == 200 and got == [b'data: {"a":0}\n\n', *chunks]
    assert not engine.streams[0].cancelled


def test_stream_error_before_output_keeps_its_status() -> None:
    engine = FakeEngine(status=400, body=b'{"error":{"message":"bad","type":"invalid_request_error"}}')
    resp = run(RouterCore({"m": ModelRoute(engine)}).forward("/v1/completions", {}, b'{"model":"m","stream":true}', "r"))
    assert resp.status == 400 and resp.stream is None and b"bad" in resp.body


def test_client_leaving_mid_stream_cancels_the_engine_request() -> None:
    engine = FakeEngine(body=b"data: 0\n\n", chunks=[b"data: 1\n\n", b"data: 2\n\n"])

    async def go() -> None:
        resp = await RouterCore({"m": ModelRoute(engine)}).forward("/v1/completions", {}, b'{"model":"m","stream":true}',
                                                                  "r")
        it = resp.stream
        await it.__anext__()
        await it.aclose()  # what Starlette does when the client disconnects

    run(go())
    assert engine.streams[0].cancelled


def test_disaggregated_prefill_then_decode_with_its_kv_transfer_params() -> None:
    params = {"helios": {"v": 1, "addr": "h:1", "num_tokens": 128}}
    prefill = FakeEngine(body=json.dumps({"choices": [], "kv_transfer_params": params}).encode())
    decode = FakeEngine(body=b'{"choices":[{"text":"done"}]}')
    core = RouterCore({"m": ModelRoute(decode, prefill)})
    body = {"model": "m", "prompt": "p", "max_tokens": 20, "n": 2, "logprobs": 3, "echo": True,
            "stream": False, "stream_options": None, "temperature": 0}
    resp = run(core.forward("/v1/completions", {}, json.dumps(body).encode(), "rid"))
    assert resp.status == 200 and resp.body == b'{"choices":[{"text":"done"}]}'
    pre = json.loads(prefill.seen[0].body)
    assert pre == {"model": "m", "prompt": "p", "max_tokens": 1, "stream": False, "temperature": 0,
                   "kv_transfer_params": {"do_remote_decode": True}}
    assert dict(prefill.seen[0].headers)["x-request-id"] == "rid-prefill"
    dec = json.loads(decode.seen[0].body)
    assert dec == {**body, "kv_transfer_params": params}


def test_a_prefill_error_is_the_clients_answer() -> None:
    prefill = FakeEngine(status=400, body=b'{"error":{"message":"too long"}}')
    decode = FakeEngine()
    core = RouterCore({"m": ModelRoute(decode, prefill)})
    resp = run(core.forward("/v1/chat/completions", {}, b'{"model":"m","messages":[]}', "r"))
    assert resp is not None and resp.status == 400 and b"too long" in resp.body
    assert decode.seen == []


# -- retries before the first token ------------------------------------------------------------


class DyingFakeEngine(FakeEngine):
    """A fake engine whose first `deaths` attempts fail as a replica that died before answering."""

    def __init__(self, deaths: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.deaths = deaths

    def _maybe_die(self) -> None:
        if self.deaths > 0:
            self.deaths -= 1
            raise EngineUnavailable("replica died")

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        self.seen.append(req)
        self._maybe_die()
        return EngineHTTPResponse(self.status, JSON, self.body)

    def stream(self, req: EngineHTTPRequest) -> EngineStream:
        stream = super().stream(req)
        die = self._maybe_die

        class _Dying(FakeStream):
            async def first(self) -> EngineHTTPResponse:
                die()
                return await super().first()

        dying = _Dying(stream.head, stream.chunks)
        self.streams[-1] = dying
        return dying


FAST = RetryPolicy(deadline_s=5.0, first_backoff_s=0.001, max_backoff_s=0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_a_replica_that_dies_before_answering_is_retried(stream: bool) -> None:
    engine = DyingFakeEngine(deaths=3, body=b"data: a\n\n", chunks=[b"data: [DONE]\n\n"])
    core = RouterCore({"m": ModelRoute(engine)}, retry=FAST)
    raw = json.dumps({"model": "m", "prompt": "x", "stream": stream}).encode()
    resp = run(core.forward("/v1/completions", {}, raw, "rid"))
    assert resp.status == 200
    assert len(engine.seen) == 4 and all(r.body == raw for r in engine.seen)
    if stream:
        assert [s.cancelled for s in engine.streams] == [True, True, True, False]

        async def drain() -> bytes:
            return b"".join([c async for c in resp.stream])

        assert run(drain()) == b"data: a\n\ndata: [DONE]\n\n"


def test_retries_end_in_503_with_retry_after_past_the_deadline() -> None:
    engine = DyingFakeEngine(deaths=10**9)
    core = RouterCore({"m": ModelRoute(engine)}, retry=RetryPolicy(deadline_s=0.2, first_backoff_s=0.01,
                                                                  max_backoff_s=0.05))
    with pytest.raises(ServiceUnavailable) as err:
        run(core.forward("/v1/completions", {}, b'{"model": "m", "prompt": "x"}', "rid"))
    assert not isinstance(err.value, EngineUnavailable)
    assert err.value.status_code == 503 and int(err.value.headers["Retry-After"]) >= 1
    assert 3 <= len(engine.seen) < 100


def test_no_retry_when_turned_off_or_on_an_engine_answer() -> None:
    engine = DyingFakeEngine(deaths=1)
    core = RouterCore({"m": ModelRoute(engine)}, retry=RetryPolicy(deadline_s=0))
    with pytest.raises(ServiceUnavailable):
        run(core.forward("/v1/completions", {}, b'{"model": "m", "prompt": "x"}', "rid"))
    assert len(engine.seen) == 1
    errors = FakeEngine(status=400, body=b'{"error": {"message": "bad"}}')  # an answer, even an error, is final
    resp = run(RouterCore({"m": ModelRoute(errors)}, retry=FAST).forward("/v1/completions", {},
                                                                         b'{"model": "m"}', "rid"))
    assert resp.status == 400 and len(errors.seen) == 1


def test_a_dead_prefill_replica_is_retried() -> None:
    prefill = DyingFakeEngine(deaths=2, body=b'{"kv_transfer_params": {"remote": 1}}')
    decode = FakeEngine()
    core = RouterCore({"m": ModelRoute(decode, prefill=prefill)}, retry=FAST)
    resp = run(core.forward("/v1/completions", {}, b'{"model": "m", "prompt": "x"}', "rid"))
    assert resp.status == 200 and len(prefill.seen) == 3
    assert json.loads(decode.seen[0].body)["kv_transfer_params"] == {"remote": 1}
