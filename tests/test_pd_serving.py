"""Disaggregated prefill/decode through real Serve, real vLLM engines and HTTP.

The tiny demo model runs as one prefill replica (kv_producer) and one decode replica
(kv_consumer) with separate KV store roots, as if on two nodes: the decode side gets the
prompt's blocks from the producer's block server. What a client sees must equal vLLM's
own unified greedy output, streamed or not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL_ID, reference_token_ids, run_app, tiny_args
from tests.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.integration

APP = "helios-pd"
# Byte-level tokenizer and 128-token KV blocks on the CPU: these prompts span 2-4 whole blocks.
PROMPTS = [
    "The history of the printing press begins long before Gutenberg. " * 6,
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 4,
    "Ray Serve routes requests to replicas; vLLM batches them into one forward pass per step. " * 4,
]
CHAT = [{"role": "system", "content": "You answer in one line. " * 8},
        {"role": "user", "content": "Summarize the history of the printing press, please, briefly. " * 3}]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pd")


@pytest.fixture(scope="module")
def otlp() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path, root: Path, otlp: OTLPReceiver) -> str:
    from ray import serve

    args = tiny_args(cache_root)
    # Traced (see the last test) and with vLLM's per-token histogram on (off by default; see test_metrics.py).
    args["observability"] = {"tracing": {"endpoint": otlp.endpoint, "sample_ratio": 1.0}, "engine_token_latency": True}
    args["models"][0].update({
        "serving": "disaggregated",
        "disaggregated": {
            "prefill_kv_cache": {"root": str(root / "prefill-ram"), "ram_bytes": "2MiB"},
            "decode_kv_cache": {"root": str(root / "decode-ram"), "ram_bytes": "256MiB",
                                "nvme_path": str(root / "decode-nvme"), "nvme_bytes": "1GiB"},
        },
    })
    url = run_app(args, APP, serve_port)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    """vLLM's own greedy token ids (one unified engine, no connector) for PROMPTS then CHAT."""
    items = [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS] + [{"messages": CHAT, "max_tokens": MAX_TOKENS}]
    return reference_token_ids(tiny_model_dir, items)


def decode_kv() -> dict[str, float]:
    """The decode replica's connector counters (its info(), as the router's probe sees it)."""
    from ray import serve

    from helios.engine.deployment import deployment_name

    handle = serve.get_deployment_handle(deployment_name(MODEL_ID, "decode"), APP)
    info = handle.info.remote().result(timeout_s=60)
    assert info["role"] == "decode"
    return info["kv"]


def wait_kv(done, timeout_s: float = 30) -> dict[str, float]:
    """The decode counters once `done(counters)` holds (the connector writes them every few steps)."""
    deadline = time.monotonic() + timeout_s
    while not done(kv := decode_kv()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return kv


def completion_ids(client: openai.OpenAI, prompt: str, stream: bool) -> list[int]:
    kwargs = {"model": MODEL_ID, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                  "extra_body": {"return_token_ids": True}}
    if not stream:
        return client.completions.create(**kwargs).choices[0].token_ids
    ids: list[int] = []
    for event in client.completions.create(stream=True, **kwargs):
        if event.choices:
            ids.extend(event.choices[0].token_ids or [])
    return ids


def test_disaggregated_greedy_output_equals_unified_vllm(client: openai.OpenAI, reference: list[list[int]]) -> None:
    before = decode_kv()
    for i, prompt in enumerate(PROMPTS):
        assert completion_ids(client, prompt, stream=False) == reference[i], i
    need = before.get("matched_tokens", 0) + 128 * len(PROMPTS)
    after = wait_kv(lambda kv: kv.get("matched_tokens", 0) >= need)
    # The decode side continued from stored KV (fetched from the producer's separate store), not from scratch.
    assert after.get("matched_tokens", 0) >= need
    assert after.get("remote_fetched_blocks", 0) > before.get("remote_fetched_blocks", 0)
    assert after.get("recompute_fallbacks", 0) == before.get("recompute_fallbacks", 0)


def test_disaggregated_streaming_equals_unified_vllm(client: openai.OpenAI, reference: list[list[int]]) -> None:
    for i, prompt in enumerate(PROMPTS):
        assert completion_ids(client, prompt, stream=True) == reference[i], i


def test_disaggregated_chat(client: openai.OpenAI, reference: list[list[int]]) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert resp.choices[0].token_ids == reference[-1]


def test_blocks_evicted_before_decode_are_recomputed_and_counted(
    client: openai.OpenAI, root: Path, tiny_model_dir: Path
) -> None:
    # 7 blocks of prompt into a producer store that holds 4 (2 MiB of 512 KiB blocks): saving the
    # last blocks evicts the first, so the decode side finds no stored prefix and recomputes.
    prompt = "Blocks evicted from the KV store must be recomputed, never fail the request. " * 12
    before = decode_kv()
    ids = completion_ids(client, prompt, stream=False)
    after = wait_kv(lambda kv: kv.get("recompute_fallbacks", 0) > before.get("recompute_fallbacks", 0))
    assert after.get("recompute_fallbacks", 0) > before.get("recompute_fallbacks", 0)
    assert after.get("recompute_fallback_tokens", 0) >= 128
    blocks = [p for p in (root / "prefill-ram").rglob("*") if p.is_file() and "stats" not in p.parts]
    assert sum(p.stat().st_size for p in blocks) <= 2 << 20  # the producer's store stayed within its budget
    (expected,) = reference_token_ids(tiny_model_dir, [{"prompt": prompt, "max_tokens": MAX_TOKENS}])
    assert ids == expected


def test_disaggregated_n2_and_logprobs(client: openai.OpenAI, reference: list[list[int]]) -> None:
    """Fields that shape the output go to the decode side only: two seeded samples with logprobs come
    back, continued from the producer's KV; greedy logprobs pick the same tokens as vLLM's own output."""
    before = decode_kv()
    prompt = "Two sampled choices continue from one prefill's KV blocks, fetched once. " * 4  # new: no cache hit
    resp = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, n=2, temperature=0.9, seed=5,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    # top_logprobs is keyed by token text: byte tokens that decode alike ("\ufffd") share one key.
    shapes = [(len(c.logprobs.tokens), all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs)) for c in resp.choices]
    assert shapes == [(8, True), (8, True)]
    after = wait_kv(lambda kv: kv.get("matched_tokens", 0) > before.get("matched_tokens", 0))
    assert after.get("matched_tokens", 0) > before.get("matched_tokens", 0)
    greedy = client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=1, extra_body={"return_token_ids": True})
    assert greedy.choices[0].token_ids == reference[0]
    assert len(greedy.choices[0].logprobs.token_logprobs) == MAX_TOKENS


def test_one_disaggregated_request_is_one_trace_under_the_clients_traceparent(base_url: str, otlp: OTLPReceiver) -> None:
    """Router -> prefill replica (its KV save) -> decode replica (its KV lookup), vLLM's request spans
    under each replica's, all in the trace the client's `traceparent` named, each under the right parent."""
    import requests

    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    prompt = "A prompt no earlier test sent, so the decode side must look its blocks up. " * 5  # 2+ blocks
    r = requests.post(f"{base_url}/v1/completions", timeout=300, headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
                      json={"model": MODEL_ID, "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    names = {"helios.request", "helios.prefill", "helios.decode", "helios.engine.prefill", "helios.engine.decode",
             "helios.kv.save", "helios.kv.lookup", "llm_request"}
    spans = otlp.wait_for(trace_id, names, counts={"llm_request": 2})  # one from each engine
    one = {s.name: s for s in spans if s.name != "llm_request"}
    assert one["helios.request"].parent_id == client_span
    assert one["helios.prefill"].parent_id == one["helios.request"].span_id
    assert one["helios.decode"].parent_id == one["helios.request"].span_id
    assert one["helios.engine.prefill"].parent_id == one["helios.prefill"].span_id
    assert one["helios.engine.decode"].parent_id == one["helios.decode"].span_id
    assert one["helios.kv.save"].parent_id == one["helios.engine.prefill"].span_id
    assert one["helios.kv.lookup"].parent_id == one["helios.engine.decode"].span_id
    vllm_parents = {s.parent_id for s in spans if s.name == "llm_request"}
    ids = {s.span_id: s.name for s in spans}
    assert vllm_parents == {one["helios.engine.prefill"].span_id, one["helios.engine.decode"].span_id}, (
        [(s.name, s.span_id, s.parent_id, ids.get(s.parent_id)) for s in spans])
    assert one["helios.request"].attributes["helios.model"] == MODEL_ID
    assert one["helios.kv.lookup"].attributes["helios.cached_tokens"] > 0  # the decode side got the prefill's blocks
    assert one["helios.engine.decode"].attributes["gen_ai.usage.completion_tokens"] == 4
    assert not any(prompt[:40] in str(v) for s in spans for v in s.attributes.values())  # never prompt text


def test_engine_token_latency_exports_vllms_inter_token_histogram(client: openai.OpenAI) -> None:
    """`observability.engine_token_latency: true` reaches the engine replicas: the decode side's vLLM
    records one inter-token value per generated token after the first, in the node's Ray export."""
    import ray
    import requests

    client.completions.create(model=MODEL_ID, prompt="Inter-token latency, please.", max_tokens=MAX_TOKENS)
    port = ray.nodes()[0]["MetricsExportPort"]
    prefix = "ray_vllm_inter_token_latency_seconds_count{"
    deadline, counts = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(prefix) and f'model_name="{MODEL_ID}"' in line]
        if sum(counts) >= MAX_TOKENS - 1:
            break
        time.sleep(1)
    assert sum(counts) >= MAX_TOKENS - 1, counts
