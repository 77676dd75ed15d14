"""The edge: API keys (/v1/* needs `Authorization: Bearer <key>`, health stays open), per-key rate
limits, and the model's bounded queue (load shed with 429 / 503 and Retry-After)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import MODEL_ID, run_app, tiny_args

pytestmark = pytest.mark.integration

KEY = "sk-helios-test-key"
KEY2 = "sk-helios-second-key"
RPM = 30
QUEUE_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    # HELIOS_API_KEYS is read in the router replica: pass it the way a deployment would.
    # A model that runs 2 requests at once and queues 2 more, so overload is cheap to cause.
    args = tiny_args(cache_root, api_keys=[KEY, KEY2], queue_timeout_s=QUEUE_TIMEOUT_S,
                     rate_limits={"requests_per_minute": RPM})
    args["models"][0]["deployment"] = {"max_ongoing_requests": 2, "max_queued_requests": 2}
    url = run_app(args, "helios-auth", serve_port)
    yield url
    serve.delete("helios-auth")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
     {"Authorization": "Bearer "}],
)
def test_requests_without_the_right_key_are_401(base_url: str, headers: dict) -> None:
    for method, path, body in [("post", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}),
                               ("post", "/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}),
                               ("get", "/v1/models", None)]:
        r = requests.request(method, base_url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert KEY not in r.text


def test_openai_client_with_the_key_is_served(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    assert list(stream)[-1].choices[0].finish_reason in ("length", "stop")
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


def test_openai_client_with_a_wrong_key_gets_authentication_error(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=3)


def test_auth_is_checked_before_the_model_lookup(base_url: str) -> None:
    r = requests.post(f"{base_url}/v1/completions", json={"model": "secret-model-name", "prompt": "x"})
    assert r.status_code == 401


def test_health_endpoints_need_no_key(base_url: str) -> None:
    assert requests.get(f"{base_url}/healthz").status_code == 200
    assert requests.get(f"{base_url}/readyz").status_code == 200


def test_a_key_past_its_request_rate_gets_429(base_url: str) -> None:
    """The key gets its minute's burst (RPM requests) plus what the bucket refills while they run
    (RPM / 60 a second), then 429; a slow machine refills more, so the bound counts elapsed time."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY2, max_retries=0)
    started, served = time.monotonic(), 0
    with pytest.raises(openai.RateLimitError) as refused:
        while served <= 3 * RPM:
            client.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
            served += 1
    elapsed = time.monotonic() - started
    assert RPM <= served <= RPM + elapsed * RPM / 60 + 1, (served, elapsed)
    last = refused.value.response
    assert last.status_code == 429 and int(last.headers["Retry-After"]) >= 1
    assert last.json()["error"]["code"] == "rate_limit_exceeded"
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}
    ok = requests.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200  # the other key has its own budget


def test_an_overloaded_model_sheds_with_retry_after_and_nothing_waits_past_the_queue_timeout(base_url: str) -> None:
    """16 long requests at a model that runs 2 and queues 2: 2 are served, 2 wait out the queue timeout
    (503), 12 are shed at once (429); every refusal says when to come back."""
    body = {"model": MODEL_ID, "prompt": "a long story", "max_tokens": 1500, "ignore_eos": True}

    def send(_: int) -> tuple[requests.Response, float]:
        started = time.monotonic()
        r = requests.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=600)
        return r, time.monotonic() - started

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    by_status: dict[int, list[tuple[requests.Response, float]]] = {}
    for r, took in answers:
        by_status.setdefault(r.status_code, []).append((r, took))
    assert set(by_status) <= {200, 429, 503}, {s: [r.text for r, _ in a] for s, a in by_status.items()}
    assert len(by_status.get(200, [])) >= 2 and len(by_status.get(429, [])) >= 8
    for r, _ in by_status[200]:
        assert r.json()["usage"]["completion_tokens"] == 1500
    served_in = min(took for _, took in by_status[200])
    for status in (429, 503):
        for r, took in by_status.get(status, []):
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] in ("rate_limit_error", "service_unavailable")
            assert took < served_in  # refused at once or after the queue timeout, not left to wait for a slot
