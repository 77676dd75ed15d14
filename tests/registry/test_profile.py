"""Resource profiles read from safetensors headers and config.json, checked against hand-computed values."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from helios.config import StorageConfig
from helios.errors import InvalidRequest
from helios.registry.profile import ResourceProfile, profile_from_dir, profile_from_store
from helios.storage.store import ModelStore
from tests.registry.conftest import store_section

# tiny: hidden 256, intermediate 512, 4 layers, 4 heads, 2 KV heads, head dim 64, vocab 264, float32.
#   embed_tokens and lm_head: 264 x 256 = 67,584 each; final norm 256
#   per layer: 2 norms 2 x 256 = 512; q and o 2 x (256 x 256) = 131,072; k and v 2 x (128 x 256) = 65,536;
#              gate, up, down 3 x (512 x 256) = 393,216  -> 590,336
#   params = 4 x 590,336 + 2 x 67,584 + 256 = 2,496,768; bytes = 4 x params = 9,987,072
#   KV per token = 4 layers x 2 KV heads x 64 x 2 (K and V) x 4 B = 4,096
TINY_PARAMS = 2_496_768
TINY_WEIGHT_BYTES = 9_987_072
TINY_KV_PER_TOKEN = 4_096

# bench: hidden 2048, intermediate 5632, 16 layers, 32 heads, 4 KV heads, head dim 64, vocab 264, bfloat16.
#   embed_tokens and lm_head: 264 x 2048 = 540,672 each; final norm 2,048
#   per layer: 2 norms 4,096; q and o 2 x (2048 x 2048) = 8,388,608; k and v 2 x (256 x 2048) = 1,048,576;
#              gate, up, down 3 x (5632 x 2048) = 34,603,008  -> 44,044,288
#   params = 16 x 44,044,288 + 2 x 540,672 + 2,048 = 705,792,000; bytes = 2 x params = 1,411,584,000
#   KV per token = 16 layers x 4 KV heads x 64 x 2 x 2 B = 16,384
BENCH_PARAMS = 705_792_000
BENCH_WEIGHT_BYTES = 1_411_584_000
BENCH_KV_PER_TOKEN = 16_384


def test_tiny_profile_equals_its_architecture(tiny_model_dir: Path) -> None:
    p = profile_from_dir(tiny_model_dir)
    assert (p.weight_bytes, p.num_params, p.dtype, p.dtypes) == (
        TINY_WEIGHT_BYTES, TINY_PARAMS, "float32", {"float32": TINY_WEIGHT_BYTES}
    )
    assert (p.num_layers, p.num_attention_heads, p.num_kv_heads, p.head_dim) == (4, 4, 2, 64)
    assert (p.kv_dtype, p.kv_dtype_bytes, p.kv_bytes_per_token) == ("float32", 4, TINY_KV_PER_TOKEN)
    assert (p.max_model_len, p.num_shards, p.num_tensors) == (2048, 1, 3 + 4 * 9)
    assert p.weights_gib == round(TINY_WEIGHT_BYTES / 2**30, 3)


@pytest.mark.integration
def test_bench_profile_equals_its_architecture(bench_model_dir: Path) -> None:
    p = profile_from_dir(bench_model_dir)
    assert (p.weight_bytes, p.num_params, p.dtype) == (BENCH_WEIGHT_BYTES, BENCH_PARAMS, "bfloat16")
    assert (p.num_layers, p.num_attention_heads, p.num_kv_heads, p.head_dim) == (16, 32, 4, 64)
    assert (p.kv_dtype, p.kv_dtype_bytes, p.kv_bytes_per_token) == ("bfloat16", 2, BENCH_KV_PER_TOKEN)
    assert (p.max_model_len, p.num_shards, p.num_tensors) == (4096, 3, 3 + 16 * 9)
    # the headers account for every byte of the shards
    shards = sorted(bench_model_dir.glob("*.safetensors"))
    data = 0
    for f in shards:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        data += f.stat().st_size - 8 - n
    assert data == BENCH_WEIGHT_BYTES


def test_memory_is_weights_plus_kv_for_context_and_batch(tiny_model_dir: Path) -> None:
    p = profile_from_dir(tiny_model_dir)
    assert p.memory_bytes(1000, 2) == TINY_WEIGHT_BYTES + TINY_KV_PER_TOKEN * 1000 * 2  # 18,179,072
    assert p.memory_bytes() == TINY_WEIGHT_BYTES + TINY_KV_PER_TOKEN * 2048  # max_model_len, one sequence
    assert p.memory_bytes(1000, 2, kv_dtype="bfloat16") == TINY_WEIGHT_BYTES + 2048 * 1000 * 2
    assert p.memory_bytes(1000, 2, kv_dtype="fp8") == TINY_WEIGHT_BYTES + 1024 * 1000 * 2
    with pytest.raises(InvalidRequest, match="batch"):
        p.memory_bytes(1000, 0)
    with pytest.raises(InvalidRequest, match="kv_dtype|KV cache dtype"):
        p.memory_bytes(1000, 1, kv_dtype="float7")


def test_a_dumped_profile_reads_back_equal(tiny_model_dir: Path) -> None:
    p = profile_from_dir(tiny_model_dir)
    dumped = json.loads(json.dumps(p.model_dump(mode="json")))
    assert dumped["kv_bytes_per_token"] == TINY_KV_PER_TOKEN
    assert ResourceProfile.model_validate(dumped) == p


def test_profile_through_the_store_reads_headers_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = ModelStore.from_config(StorageConfig.model_validate(store_section(tmp_path)), tmp_path)
    manifest = store.push(tiny_model_dir, "org/tiny", "v1")
    reads: list[tuple[str, int]] = []
    remote = store.remote
    original = remote.read_range

    def counting(digest: str, start: int, end: int) -> bytes:
        reads.append((digest, end - start))
        return original(digest, start, end)

    remote.read_range = counting  # type: ignore[method-assign]
    p = profile_from_store(store, manifest)
    assert p == profile_from_dir(tiny_model_dir)
    weights = next(f for f in manifest.files if f.name == "model.safetensors")
    read_of_weights = sum(n for d, n in reads if d == weights.sha256)
    assert 0 < read_of_weights < 100_000 < weights.size  # the header, not the tensors
    assert store.local[0].blobs() == []  # nothing was brought into a local tier


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path


def _config(root: Path, **over: object) -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "torch_dtype": "float16"}
    config.update(over)
    (root / "config.json").write_text(json.dumps(config))


def test_config_defaults_follow_transformers(tmp_path: Path) -> None:
    """No num_key_value_heads means MHA; no head_dim means hidden_size / heads."""
    _config(tmp_path)
    _safetensors(tmp_path / "model.safetensors", {"w": np.zeros((4, 8), np.float16), "b": np.zeros(3, np.float32)})
    p = profile_from_dir(tmp_path)
    assert (p.num_kv_heads, p.head_dim) == (8, 64)
    assert p.kv_bytes_per_token == 2 * 8 * 64 * 2 * 2
    assert p.dtypes == {"float16": 64, "float32": 12} and p.dtype == "float16"
    assert profile_from_dir(tmp_path, kv_dtype="fp8").kv_bytes_per_token == 2 * 8 * 64 * 2 * 1


def test_a_truncated_shard_is_rejected(tmp_path: Path) -> None:
    _config(tmp_path)
    f = _safetensors(tmp_path / "model.safetensors", {"w": np.zeros((16, 16), np.float32)})
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(InvalidRequest, match="the file has"):
        profile_from_dir(tmp_path)


def test_a_config_without_layers_names_the_key(tmp_path: Path) -> None:
    _config(tmp_path, num_hidden_layers=None)
    _safetensors(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(InvalidRequest, match="num_hidden_layers"):
        profile_from_dir(tmp_path)
