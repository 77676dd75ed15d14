"""API keys: when configured, /v1/* needs `Authorization: Bearer <key>`; health stays open."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import MODEL_ID, run_app, tiny_args

pytestmark = pytest.mark.integration

KEY = "sk-helios-test-key"


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    # HELIOS_API_KEYS is read in the router replica: pass it the way a deployment would.
    args = tiny_args(cache_root, api_keys=[KEY])
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
