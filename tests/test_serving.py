"""End to end through real Ray Serve, a real vLLM CPU engine and real HTTP (official openai client)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
import requests

from tests.conftest import (
    MAX_TOKENS,
    MODEL_ID,
    PROMPTS,
    check_disconnect_aborts,
    greedy_token_ids,
    local_storage,
    run_app,
    tiny_args,
)

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    # Through the storage tiers, as `make serve` runs: demo pushed to a file:// remote, pulled into
    # RAM, loaded by vLLM with load_format="helios". Greedy outputs below must still equal vLLM's own.
    # Retries wait for a restarted replica up to 300 s: the last test kills the only one.
    args = {**tiny_args(cache_root, retry_deadline_s=300), "storage": local_storage(cache_root / "tiers")}
    url = run_app(args, "helios-serving", serve_port)
    yield url
    serve.delete("helios-serving")


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


# -- the two endpoints, streaming and not ---------------------------------------------


def test_completion_returns_tokens_and_usage(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=10, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(b"Hello")  # byte-level tokenizer, no BOS
    assert 1 <= resp.usage.completion_tokens <= 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_ID, "prompt": "Streaming test", "max_tokens": 40, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs)
    events = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == full.choices[0].text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 40
    assert len([e for e in events if e.choices]) > 1  # really streamed, not one blob


def test_chat_completion_stream_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    full = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 20
    # prompt = template: BOS <|user|> \n text <|end|> \n <|assistant|> \n
    assert full.usage.prompt_tokens == 1 + 1 + 1 + len("hi there") + 1 + 1 + 1 + 1
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_chat_accepts_text_content_parts(client: openai.OpenAI) -> None:
    # vLLM's chat layer joins text parts with a newline before the template sees them.
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    a = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}],
                                       max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi \nthere"}],
                                       max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_ends_the_completion(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL_ID, prompt="Stop test", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = next((ch for ch in text[3:] if ch.isprintable() and ch.strip() and ch != "\ufffd"), None)
    if stop is None:
        pytest.skip("demo output has no printable character to stop on")
    stopped = client.completions.create(model=MODEL_ID, prompt="Stop test", max_tokens=30, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


# -- greedy output equals vLLM's own ------------------------------------------------------


def test_greedy_output_equals_vllm(client: openai.OpenAI, vllm_reference: list[list[int]]) -> None:
    assert greedy_token_ids(client) == vllm_reference


def test_engine_loaded_the_model_through_the_tiers(base_url: str, cache_root: Path) -> None:
    """The replica pulled the pushed demo model remote -> RAM, loaded it with the Helios loader, filled NVMe."""
    from ray import serve

    from helios.engine.deployment import deployment_name
    from helios.storage.manifest import MANIFEST_NAME, Manifest

    handle = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name="helios-serving")
    timings = handle.info.remote().result()["timings"]
    assert timings["load_s"] > 0 and timings["load_bytes"] > 8e6  # the loader's own report
    assert timings["fetch_s"] > 0 and timings["engine_start_s"] > 0
    tiers = cache_root / "tiers"
    manifests = list((tiers / "remote" / "manifests").rglob("*.json"))
    assert len(manifests) == 1
    manifest = Manifest.from_json(manifests[0].read_bytes())
    snapshot = next((tiers / "ram" / "snapshots").glob("*/*"))
    assert Manifest.from_json((snapshot / MANIFEST_NAME).read_bytes()) == manifest
    for f in manifest.files:
        for tier in ("remote", "ram"):
            assert (tiers / tier / "blobs" / f.sha256).stat().st_size == f.size
        assert (snapshot / f.name).resolve() == tiers / "ram" / "blobs" / f.sha256
    deadline = time.time() + 30  # NVMe is filled behind the load
    while not all((tiers / "nvme" / "blobs" / f.sha256).exists() for f in manifest.files):
        assert time.time() < deadline, "NVMe tier never filled"
        time.sleep(0.2)


def test_the_engine_core_is_forked_from_the_replicas_zygote(base_url: str) -> None:
    """vLLM's engine core is a child of the zygote (a forkserver that imported vLLM while the replica did)
    and its worker a child of the engine core: neither ran an import phase of its own."""
    from ray import serve

    from helios.engine.deployment import deployment_name

    info = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name="helios-serving").info.remote().result()
    assert {"imports_s", "engine_process_start_s", "engine_init_s"} <= set(info["timings"])
    tree = psutil.Process(info["pid"]).children(recursive=True)
    core = next(p for p in tree if p.name() == "VLLM::EngineCore")
    zygote = core.parent()
    assert "multiprocessing.forkserver" in " ".join(zygote.cmdline())
    assert zygote.parent().pid == info["pid"]
    assert [p.name() for p in core.children()] == ["VLLM::Worker"]


def test_streamed_greedy_tokens_equal_vllm(base_url: str, vllm_reference: list[list[int]]) -> None:
    body = {"model": MODEL_ID, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "return_token_ids": True}
    ids: list[int] = []
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    assert ids == vllm_reference[0]


# -- models, health ------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].owned_by == "helios"
    assert models[0].model_extra["max_model_len"] == 2048
    assert models[0].model_extra["ready"] is True


def test_health_and_readiness(base_url: str) -> None:
    assert requests.get(f"{base_url}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {MODEL_ID: True}


# -- errors: OpenAI shape, right status, replica unharmed -------------------------------------


def _error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(base_url: str, stream: bool) -> None:
    r = requests.post(f"{base_url}/v1/completions", json={"model": "nope", "prompt": "x", "stream": stream})
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_unknown_model_raises_not_found_in_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", "\"caf\xe9\"".encode("latin-1")])
def test_malformed_json_is_400(base_url: str, raw: bytes) -> None:
    r = requests.post(f"{base_url}/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert _error(r, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL_ID}, "prompt"),
        ({"model": MODEL_ID, "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": MODEL_ID, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL_ID, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL_ID, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": MODEL_ID, "prompt": ""}, "prompt"),
        ({"model": MODEL_ID, "prompt": [1, 2, 99999]}, None),
        ({"model": MODEL_ID, "prompt": "x", "stop": ""}, None),
        ({"model": 7, "prompt": "x"}, "model"),
    ],
)
def test_invalid_completion_parameters_are_400(base_url: str, body: dict, param: str | None) -> None:
    for stream in (False, True):
        r = requests.post(f"{base_url}/v1/completions", json={**body, "stream": stream})
        err = _error(r, 400)
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param


def test_model_may_be_left_out_when_one_is_served(client: openai.OpenAI, base_url: str) -> None:
    r = requests.post(f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL_ID


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL_ID, "messages": []}, None),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"model": MODEL_ID, "messages": "hello"}, "messages"),
    ],
)
def test_invalid_chat_parameters_are_400(base_url: str, body: dict, param: str | None) -> None:
    r = requests.post(f"{base_url}/v1/chat/completions", json=body)
    err = _error(r, 400)
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400(base_url: str, stream: bool) -> None:
    r = requests.post(f"{base_url}/v1/completions",
                      json={"model": MODEL_ID, "prompt": "a" * 3000, "max_tokens": 5, "stream": stream})
    err = _error(r, 400)
    assert err["code"] == "context_length_exceeded"
    assert "2048" in err["message"]


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="x" * 5000, max_tokens=4)
    assert info.value.code == "context_length_exceeded"


def test_unknown_route_and_method_use_error_shape(base_url: str) -> None:
    assert _error(requests.get(f"{base_url}/v1/nothing-here"), 404)["type"] == "not_found_error"
    assert _error(requests.get(f"{base_url}/v1/completions"), 405)


def test_errors_leave_the_engine_serving(client: openai.OpenAI, base_url: str) -> None:
    for _ in range(3):
        requests.post(f"{base_url}/v1/completions", json={"model": MODEL_ID, "prompt": "a" * 5000})
        requests.post(f"{base_url}/v1/completions", data=b"{")
    resp = client.completions.create(model=MODEL_ID, prompt="still alive?", max_tokens=4)
    assert resp.usage.completion_tokens >= 1
    assert requests.get(f"{base_url}/readyz").status_code == 200


# -- a client that goes away mid-stream ----------------------------------------------------


def _unfinished_in_engine() -> int:
    from ray import serve

    from helios.engine.deployment import deployment_name

    handle = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name="helios-serving")
    return handle.num_unfinished_requests.remote().result(timeout_s=30)


def test_client_disconnect_aborts_the_engine_request(base_url: str) -> None:
    check_disconnect_aborts(base_url, _unfinished_in_engine)


# -- a killed replica: no request lost, no engine process left (keep last: the replica restarts) --------


def _engine_replica_pid() -> int:
    from ray import serve

    from helios.engine.deployment import deployment_name

    handle = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name="helios-serving")
    return handle.info.remote().result(timeout_s=300)["pid"]


def _vllm_processes(pid: int) -> list[psutil.Process]:
    """vLLM's engine core and worker under a replica (they retitle themselves `VLLM::...`: the name
    and, where setproctitle could rewrite it, the command line), and the zygote they were forked from."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "VLLM::" in p.name() or any(m in " ".join(p.cmdline()) for m in ("VLLM::", "multiprocessing.forkserver")):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_killed_replica_loses_no_request_and_leaves_no_engine_process(base_url: str) -> None:
    deadline = time.monotonic() + 60  # a replica Serve has just replaced may still be starting its engine
    while not (engine := _vllm_processes(pid := _engine_replica_pid())):
        tree = [(p.pid, p.name(), " ".join(p.cmdline())[:80]) for p in psutil.Process(pid).children(recursive=True)]
        assert time.monotonic() < deadline, f"no vLLM engine process under the replica {pid}: {tree}"
        time.sleep(1)
    body = {"model": MODEL_ID, "prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "return_token_ids": True}
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(requests.post, f"{base_url}/v1/completions", json=body, timeout=600) for _ in range(20)]
        deadline = time.monotonic() + 60
        while _unfinished_in_engine() < 20:  # all 20 accepted and generating
            assert time.monotonic() < deadline and not any(f.done() for f in futures)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers if r.status_code != 200]
    ids = [r.json()["choices"][0]["token_ids"] for r in answers]
    assert len(ids[0]) == 400 and all(i == ids[0] for i in ids)  # retried on the new replica, same greedy tokens
    assert _engine_replica_pid() != pid
    deadline = time.monotonic() + 30  # the killed replica's watchdog SIGKILLs its engine core and worker
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine):
        assert time.monotonic() < deadline, [p.pid for p in engine if p.is_running()]
        time.sleep(0.2)
