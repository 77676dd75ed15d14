"""vLLM's cache root through the tiers: what one node's engine compiled, another node's restores.

The cache directories are laid out as vLLM writes them (torch_compile_cache/<hash>/rank_0_0/
<prefix>/..., startup_plan/...); the store is a real S3 server (moto) behind two nodes' tiers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helios.storage.engine_cache import EngineCacheKey, cache_files, restore, save
from helios.storage.store import ModelStore
from tests.storage.conftest import S3Server, storage_config

KEY = EngineCacheKey(vllm="0.32.0+cpu", torch="2.13.0+cpu", model="sha256:abc", tensor_parallel=2,
                     device="NVIDIA H200", dtype="bfloat16")


def compiled(root: Path, hash_key: str, n: int = 3) -> dict[str, bytes]:
    """What vLLM leaves after compiling: graph modules, inductor artifacts, a startup plan."""
    files = {f"torch_compile_cache/{hash_key}/rank_{r}_0/backbone/artifact_{i}": os.urandom(4096 + i)
             for r in range(2) for i in range(n)}
    files[f"torch_compile_cache/{hash_key}/rank_0_0/backbone/computation_graph.py"] = b"def forward(x): ..."
    files["startup_plan/startup_plan_f00d.json"] = b'{"kv_cache_memory_bytes": 1}'
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.fixture
def nodes(tmp_path: Path, s3: S3Server) -> tuple[ModelStore, ModelStore]:
    url = s3.url()
    return tuple(  # type: ignore[return-value]
        ModelStore.from_config(storage_config(tmp_path / n, url, s3.options), tmp_path / n, shared=False)
        for n in ("node-a", "node-b")
    )


def test_a_cache_compiled_on_one_node_is_restored_byte_for_byte_on_another(nodes, tmp_path: Path) -> None:
    a, b = nodes
    assert restore(a, KEY, tmp_path / "a-root") is None  # first start anywhere: nothing stored, vLLM compiles
    files = compiled(tmp_path / "a-root", "0123456789")
    saved = save(a, KEY, tmp_path / "a-root", None)
    assert saved is not None and {f.name for f in saved.files} == set(files)

    restored = restore(b, KEY, tmp_path / "b-root")
    assert restored is not None
    assert cache_files(tmp_path / "b-root") == sorted(files)
    assert all((tmp_path / "b-root" / n).read_bytes() == data for n, data in files.items())
    assert not (tmp_path / "b-root" / "startup_plan" / "startup_plan_f00d.json").is_symlink()  # vLLM writes here
    assert save(b, KEY, tmp_path / "b-root", restored) is None  # nothing new: nothing pushed


def test_new_artifacts_are_pushed_beside_the_old_and_other_keys_get_nothing(nodes, tmp_path: Path) -> None:
    a, b = nodes
    first = compiled(tmp_path / "a-root", "0123456789")
    save(a, KEY, tmp_path / "a-root", None)
    restored = restore(b, KEY, tmp_path / "b-root")
    more = compiled(tmp_path / "b-root", "abcdefabcd", n=1)  # another config of the same model compiled on b
    assert save(b, KEY, tmp_path / "b-root", restored) is not None
    assert cache_files(tmp_path / "a2") == [] and restore(a, KEY, tmp_path / "a2") is not None
    assert cache_files(tmp_path / "a2") == sorted({**first, **more})

    for other in (EngineCacheKey(**{**KEY.__dict__, "device": "NVIDIA A100"}),
                  EngineCacheKey(**{**KEY.__dict__, "tensor_parallel": 1}),
                  EngineCacheKey(**{**KEY.__dict__, "vllm": "0.33.0"})):
        assert other.digest() != KEY.digest()
        assert restore(b, other, tmp_path / f"other-{other.digest()}") is None


def test_only_compile_caches_and_startup_plans_travel(nodes, tmp_path: Path) -> None:
    a, b = nodes
    root = tmp_path / "a-root"
    files = compiled(root, "0123456789", n=1)
    (root / "assets" / "model_streamer").mkdir(parents=True)
    (root / "assets" / "model_streamer" / "config.json").write_bytes(b"{}")  # vLLM's downloads: not ours to ship
    saved = save(a, KEY, root, None)
    assert saved is not None and {f.name for f in saved.files} == set(files)
    restore(b, KEY, tmp_path / "b-root")
    assert cache_files(tmp_path / "b-root") == sorted(files)


def test_an_empty_cache_root_saves_nothing(nodes, tmp_path: Path) -> None:
    a, _ = nodes
    (tmp_path / "empty" / "torch_compile_cache").mkdir(parents=True)
    (tmp_path / "empty" / "assets").mkdir(parents=True)
    (tmp_path / "empty" / "assets" / "x.json").write_bytes(b"{}")
    assert save(a, KEY, tmp_path / "empty", None) is None
    assert save(a, KEY, tmp_path / "missing", None) is None
    assert KEY.model_id() == "helios-engine-cache/0.32.0-cpu"
