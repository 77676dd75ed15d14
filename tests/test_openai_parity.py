"""Helios answers the OpenAI API exactly as vLLM's own server does, on the same weights.

Helios runs `make serve`'s own config (serve_configs/local.yaml). One session runs vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the
tiny demo model and on the same model as an embedder (pooling runner), and Helios serving
both. Every request below goes to both, one at a time: same status, and for greedy or seeded
requests the same body apart from ids and timestamps, streamed and not. Then the official
`openai` client gets tool calls, schema-valid JSON, logprobs, two choices and embeddings
from Helios, and a schemathesis fuzz of Helios's /openapi.json finds no 5xx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
import yaml

from tests.conftest import MODEL_ID, TINY_ENGINE, free_port, local_storage, run_app

pytestmark = pytest.mark.integration

APP = "helios-parity"
EMBED_ID = "helios-demo-embed"
# The demo model's weights are random: left free between JSON tokens it can emit whitespace until
# max_tokens, so structured outputs here allow none (vLLM's own option, set alike on both servers).
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["city"]}, "strict": True}}
CLOCK = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}}, "required": ["zone"]}}}
# Bounded fields: the demo model's random weights would otherwise fill strings with control bytes.
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": -3}"},
]
C, CH, G = "/v1/completions", "/v1/chat/completions", {"temperature": 0}

# (name, path, body, compare bodies?) -- bodies are compared where the output is greedy or seeded.
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("completion", C, {"prompt": "Hello, my name is", "max_tokens": 12, **G}, True),
    ("completion_stream", C, {"prompt": "Hello, my name is", "max_tokens": 12, "stream": True, **G}, True),
    ("completion_stream_usage", C, {"prompt": "Ray", "max_tokens": 8, "stream": True,
                                    "stream_options": {"include_usage": True}, **G}, True),
    ("completion_stream_continuous_usage", C, {"prompt": "Ray", "max_tokens": 6, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}, **G}, True),
    ("completion_logprobs", C, {"prompt": "The sky", "max_tokens": 6, "logprobs": 3, **G}, True),
    ("completion_echo_logprobs", C, {"prompt": "The sky is", "max_tokens": 4, "echo": True, "logprobs": 2, **G}, True),
    ("completion_prompt_logprobs", C, {"prompt": "abc def", "max_tokens": 3, "prompt_logprobs": 2, **G}, True),
    ("completion_n2_seeded", C, {"prompt": "Once", "max_tokens": 8, "n": 2, "temperature": 0.9, "seed": 7}, True),
    ("completion_n2_stream_seeded", C, {"prompt": "Once", "max_tokens": 8, "n": 2, "temperature": 0.9, "seed": 7,
                                        "stream": True}, True),
    ("completion_batch", C, {"prompt": ["First prompt", "Second, longer prompt"], "max_tokens": 8, **G}, True),
    ("completion_token_ids", C, {"prompt": [72, 101, 108, 108, 111], "max_tokens": 8, **G}, True),
    ("completion_token_id_batch", C, {"prompt": [[72, 105], [66, 121, 101]], "max_tokens": 5, **G}, True),
    ("completion_logit_bias", C, {"prompt": "x", "max_tokens": 5, "logit_bias": {"65": 100}, **G}, True),
    ("completion_bad_words", C, {"prompt": "Hello", "max_tokens": 10, "bad_words": ["a", "e"], **G}, True),
    ("completion_return_token_ids", C, {"prompt": "Tokens", "max_tokens": 6, "return_token_ids": True, **G}, True),
    ("completion_stop", C, {"prompt": "Stop here", "max_tokens": 20, "stop": ["a", "e"], "ignore_eos": True, **G}, True),
    ("completion_min_tokens", C, {"prompt": "Min", "max_tokens": 10, "min_tokens": 10, **G}, True),
    ("completion_priority_0", C, {"prompt": "p", "max_tokens": 3, "priority": 0, **G}, True),
    ("completion_structured_regex", C, {"prompt": "Code:", "max_tokens": 12,
                                        "structured_outputs": {"regex": "[a-z]{3}-[0-9]{3}"}, **G}, True),
    ("completion_seeded_sampling", C, {"prompt": "Sample", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9,
                                       "top_k": 50, "seed": 3}, True),
    ("completion_unknown_field_ignored", C, {"prompt": "x", "max_tokens": 2, "not_a_field": 1, **G}, True),
    ("completion_max_tokens_over_context", C, {"prompt": "x", "max_tokens": 5000, **G}, False),
    ("completion_prompt_too_long", C, {"prompt": "a" * 3000, "max_tokens": 4}, False),
    ("completion_negative_temperature", C, {"prompt": "x", "temperature": -1}, False),
    ("completion_wrong_type", C, {"prompt": "x", "max_tokens": "ten"}, False),
    ("completion_too_many_logprobs", C, {"prompt": "x", "max_tokens": 2, "logprobs": 50}, False),
    ("completion_priority_unsupported", C, {"prompt": "x", "max_tokens": 2, "priority": 5}, False),
    ("completion_out_of_vocab", C, {"prompt": [1, 2, 99999], "max_tokens": 2}, False),
    ("chat", CH, {"messages": USER, "max_tokens": 12, **G}, True),
    ("chat_stream_usage", CH, {"messages": USER, "max_tokens": 10, "stream": True,
                               "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **G}, True),
    ("chat_logprobs", CH, {"messages": USER, "max_tokens": 5, "logprobs": True, "top_logprobs": 3, **G}, True),
    ("chat_n2_seeded", CH, {"messages": USER, "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 11}, True),
    ("chat_tools_required", CH, {"messages": USER, "tools": [WEATHER, CLOCK], "tool_choice": "required",
                                 "max_tokens": 80, **G}, True),
    ("chat_tools_named", CH, {"messages": USER, "tools": [WEATHER, CLOCK], "max_tokens": 60, **G,
                              "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, True),
    ("chat_tools_named_stream", CH, {"messages": USER, "tools": [WEATHER, CLOCK], "max_tokens": 60, "stream": True,
                                     "tool_choice": {"type": "function", "function": {"name": "get_time"}}, **G}, True),
    ("chat_tools_none", CH, {"messages": USER, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8, **G}, True),
    ("chat_tools_auto", CH, {"messages": USER, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 8, **G}, True),
    ("chat_tool_history", CH, {"messages": HISTORY, "tools": [WEATHER], "max_tokens": 8, **G}, True),
    ("chat_json_schema", CH, {"messages": USER, "max_tokens": 60, **G, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}, True),
    ("chat_json_object", CH, {"messages": USER, "max_tokens": 30, "response_format": {"type": "json_object"}, **G},
     True),
    ("chat_template_kwargs", CH, {"messages": USER, "max_tokens": 5, "chat_template_kwargs": {"unused": 1}, **G}, True),
    ("chat_continue_final_message", CH, {"messages": [*USER, {"role": "assistant", "content": "It is"}],
                                         "add_generation_prompt": False, "continue_final_message": True,
                                         "max_tokens": 6, **G}, True),
    ("chat_return_token_ids", CH, {"messages": USER, "max_tokens": 5, "return_token_ids": True, **G}, True),
    ("chat_text_parts", CH, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}],
                             "max_tokens": 5, **G}, True),
    ("chat_empty_messages", CH, {"messages": [], "max_tokens": 5}, False),
    ("chat_messages_wrong_type", CH, {"messages": "hello"}, False),
    ("chat_tool_choice_unknown_tool", CH, {"messages": USER, "tools": [WEATHER], "max_tokens": 5,
                                           "tool_choice": {"type": "function", "function": {"name": "nope"}}}, False),
    ("tokenize_prompt", "/tokenize", {"prompt": "Hello world"}, True),
    ("tokenize_messages", "/tokenize", {"messages": USER}, True),
    ("detokenize", "/detokenize", {"tokens": [72, 101, 108, 108, 111]}, True),
    ("embeddings", "/v1/embeddings", {"model": EMBED_ID, "input": "Hello"}, True),
    ("embeddings_batch", "/v1/embeddings", {"model": EMBED_ID, "input": ["a", "bc", [72, 105]]}, True),
    ("embeddings_bad_input", "/v1/embeddings", {"model": EMBED_ID, "input": 5}, False),
    ("unknown_model", C, {"model": "no-such-model", "prompt": "x"}, False),
]

# Fields that differ between two servers by construction: request ids, clocks, tool-call ids, and the
# fingerprint (vLLM derives it from the model's path, which differs: Helios loads from its cache).
VOLATILE = {"id", "created", "system_fingerprint"}


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _events(raw: bytes) -> list[Any]:
    """The SSE events of a stream, decoded (`[DONE]` kept as a string)."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# Keys whose streamed pieces a client concatenates; every other scalar is last-one-wins.
TEXT_KEYS = {"text", "content", "reasoning_content", "reasoning", "arguments"}


def _merge(acc: Any, new: Any, key: str = "") -> Any:
    """Fold one streamed piece into what came before, as a client assembling the stream does."""
    if new is None:
        return acc
    if key == "tool_calls" and isinstance(new, list):
        # Folded by index, also within one piece: vLLM's last delta appends what the tool parser flushes
        # at the end, so a stream whose whole output arrives in one engine step carries two pieces of call 0.
        calls = {call["index"]: call for call in acc or []}
        for call in new:
            calls[call["index"]] = _merge(calls.get(call["index"]), call)
        return [calls[i] for i in sorted(calls)]
    if acc is None:
        return new
    if isinstance(acc, str) and isinstance(new, str) and key in TEXT_KEYS:
        return acc + new
    if isinstance(acc, dict) and isinstance(new, dict):
        return {**acc, **{k: _merge(acc.get(k), v, k) for k, v in new.items()}}
    if isinstance(acc, list) and isinstance(new, list):
        return acc + new
    return new


def _assemble(events: list[Any]) -> dict[str, Any]:
    """A stream as the client assembles it: each choice's pieces joined, the last usage, and [DONE].

    Compared whole, not event by event: vLLM itself merges a request's outputs when its consumer
    lags a step behind, so where one stream's chunk boundaries fall depends on timing on either server.
    """
    top: dict[str, Any] = {}
    choices: dict[int, Any] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        top = _merge(top, {k: v for k, v in event.items() if k != "choices"})
        for choice in event.get("choices") or []:
            choices[choice["index"]] = _merge(choices.get(choice["index"]), choice)
    return {**top, "choices": [choices[i] for i in sorted(choices)], "done": events[-1:] == ["[DONE]"]}


def _send(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    r = requests.post(base + path, json=body, timeout=300)
    if body.get("stream") and r.status_code == 200:
        return r.status_code, _assemble(_events(r.content))
    return r.status_code, r.json()


@pytest.fixture(scope="module")
def vllm_servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """vLLM's own OpenAI server for the generator and the embedder, on the same weights as Helios."""
    logs = tmp_path_factory.mktemp("vllm-server")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    common = ["--dtype", TINY_ENGINE["dtype"], "--max-model-len", str(TINY_ENGINE["max_model_len"]),
              "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--disable-log-stats"]
    specs = {"generate": ["--served-model-name", MODEL_ID, "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                          "--structured-outputs-config", json.dumps(STRUCTURED)],
             "embed": ["--served-model-name", EMBED_ID, "--runner", "pooling"]}
    procs, urls = [], {}
    try:
        for kind, extra in specs.items():
            port = free_port()
            out = open(logs / f"{kind}.log", "wb")  # noqa: SIM115 - lives as long as the server
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
                 "--port", str(port), *common, *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            urls[kind] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        for (kind, url), proc in zip(urls.items(), procs):
            while True:
                assert proc.poll() is None, (logs / f"{kind}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"vLLM {kind} server did not start"
                try:
                    if requests.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
        yield urls
    finally:
        for proc in procs:  # the whole process group: the API server, its engine core and worker
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def local_yaml_args(cache_root: Path) -> dict[str, Any]:
    """`make serve`'s app args (serve_configs/local.yaml), with its cache and tiers under the test's root."""
    config = yaml.safe_load((Path(__file__).parents[1] / "serve_configs" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    # A cache root of its own: the registry persists its catalog there, and this module registers a
    # second model that later modules' fresh registries must not find.
    root = cache_root / "parity"
    # The engines start beside their weights' fetch (off by default): parity then covers that path too.
    storage = {**local_storage(root / "tiers"), "transfer": {"overlap_engine_start": True}}
    return {**args, "cache_root": str(root), "storage": storage}


@pytest.fixture(scope="module")
def helios(serve_port: int, cache_root: Path, vllm_servers: dict[str, str]) -> Iterator[str]:
    """Helios on `make serve`'s own config; its engines match the vLLM servers' flags above."""
    from ray import serve

    args = local_yaml_args(cache_root)
    tiny, embed = args["models"]
    assert (tiny["id"], embed["id"], embed["engine"]["runner"]) == (MODEL_ID, EMBED_ID, "pooling")
    assert {k: tiny["engine"][k] for k in TINY_ENGINE} == TINY_ENGINE
    assert tiny["engine"]["extra_args"]["structured_outputs_config"] == STRUCTURED
    assert (tiny["engine"]["tool_call_parser"], tiny["engine"]["enable_auto_tool_choice"]) == ("hermes", True)
    url = run_app(args, APP, serve_port)
    yield url
    serve.delete(APP)


def test_cases_cover_the_issue() -> None:
    assert len(CASES) >= 40
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, path, body, compare", CASES, ids=[c[0] for c in CASES])
def test_same_answer_as_vllm(helios: str, vllm_servers: dict[str, str], name: str, path: str, body: dict[str, Any],
                             compare: bool) -> None:
    body = {"model": MODEL_ID, **body}
    vllm_url = vllm_servers["embed" if body["model"] == EMBED_ID else "generate"]
    want_status, want = _send(vllm_url, path, body)
    got_status, got = _send(helios, path, body)
    assert got_status == want_status, (got, want)
    if got_status >= 400:
        assert set(got["error"]) == {"message", "type", "param", "code"}
        assert got["error"]["type"] != "server_error"
    elif compare:
        assert _normalize(got) == _normalize(want)


def test_json_schema_output_validates(helios: str) -> None:
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 300, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    status, resp = _send(helios, CH, body)
    assert status == 200
    jsonschema.validate(json.loads(resp["choices"][0]["message"]["content"]), PERSON)


# -- the official openai client against Helios ------------------------------------------------


@pytest.fixture(scope="module")
def client(helios: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{helios}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_tool_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=USER, tools=[WEATHER], tool_choice="required",
                                          max_tokens=300, temperature=0)
    calls = resp.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    named = client.chat.completions.create(model=MODEL_ID, messages=USER, tools=[WEATHER, CLOCK], max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"


def test_openai_client_schema_valid_json(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL_ID, messages=USER, max_tokens=300, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)


def test_openai_client_logprobs_and_two_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=5, logprobs=True, top_logprobs=3,
                                          n=2, temperature=0.7, seed=1)
    assert len(resp.choices) == 2 and [c.index for c in resp.choices] == [0, 1]
    for choice in resp.choices:
        tokens = choice.logprobs.content
        assert len(tokens) == resp.usage.completion_tokens // 2 or len(tokens) >= 1
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
    comp = client.completions.create(model=MODEL_ID, prompt="The sky", max_tokens=4, logprobs=2, echo=True,
                                     temperature=0)
    assert comp.choices[0].text.startswith("The sky")
    assert len(comp.choices[0].logprobs.tokens) == len(b"The sky") + 4


def test_openai_client_embeddings(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model=EMBED_ID, input=["hello", "world"])
    assert [d.index for d in resp.data] == [0, 1]
    assert len(resp.data[0].embedding) == len(resp.data[1].embedding) > 0
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens == len(b"hello") + len(b"world")


def test_openai_client_batch_of_prompts(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL_ID, prompt=["one", "two", "three"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]


# -- the schema and a fuzz of it ------------------------------------------------------------------


def test_openapi_describes_the_openai_routes(helios: str) -> None:
    schema = requests.get(f"{helios}/openapi.json", timeout=60).json()
    for path in (C, CH, "/v1/embeddings", "/tokenize", "/detokenize", "/v1/models", "/healthz"):
        assert path in schema["paths"], path
    assert not any(p.startswith("/admin") for p in schema["paths"])
    assert requests.get(f"{helios}/docs", timeout=30).status_code == 200


def test_fuzzed_requests_get_no_server_error(helios: str) -> None:
    """schemathesis generates requests from the schema (valid and not); none may get a 5xx."""
    import hypothesis
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{helios}/openapi.json")
    failures: list[str] = []
    count = 0

    for path in (C, CH, "/tokenize", "/detokenize"):
        operation = schema[path]["POST"]

        @hypothesis.settings(max_examples=40, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            nonlocal count
            if isinstance(case.body, dict) and case.body.get("model") is not None:
                case.body["model"] = MODEL_ID  # reach the engine, not only the router's 404
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = max(min(case.body["max_tokens"], 8), 1)
            count += 1
            resp = case.call(base_url=helios, timeout=120)
            if resp.status_code >= 500:
                failures.append(f"{case.operation.path} {resp.status_code} {case.body!r:.300} -> {resp.text[:300]}")

        fuzz()
    assert count >= 100
    assert not failures, failures[:5]
    assert requests.get(f"{helios}/readyz", timeout=30).status_code == 200  # no replica crashed
