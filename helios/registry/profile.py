"""A model version's resource profile: what its weights weigh and what its KV cache costs per token.

Placement and admission need a model's memory before any replica loads it, so the
profile comes from the checkpoint's own metadata, never from its tensors: the
safetensors headers (an 8-byte length and a JSON table of every tensor's dtype, shape
and byte range) and config.json. Read through the store, that is a few ranged reads
per shard, so a model that is only in S3 gets a profile without downloading weights.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from helios.errors import BlobNotFound, InvalidRequest
from helios.storage.manifest import Manifest
from helios.storage.store import ModelStore
from helios.storage.tiers import Tier

GIB = 1 << 30
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_FIRST_READ = 64 << 10  # one ranged read usually holds the whole header of a shard
_MAX_HEADER = 100 << 20  # safetensors' own limit

# safetensors dtype code -> (torch-style name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}
# KV cache dtypes as config.json's torch_dtype or vLLM's kv_cache_dtype spell them -> bytes per element
KV_DTYPE_BYTES: dict[str, int] = {
    **{name: size for name, size in SAFETENSORS_DTYPES.values()},
    "float": 4,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}

# (offset, end) -> bytes of one file
ReadRange = Callable[[int, int], bytes]


class ResourceProfile(BaseModel):
    """Memory a model version needs, computed once from its checkpoint metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_bytes: int = Field(..., ge=0, description="Sum of every tensor's bytes (shape x dtype size).")
    dtype: str = Field(..., description="The dtype holding most weight bytes, e.g. bfloat16.")
    dtypes: dict[str, int] = Field(..., description="Weight bytes per dtype.")
    num_params: int = Field(..., ge=0)
    num_tensors: int = Field(..., ge=0)
    num_shards: int = Field(..., ge=1)
    architecture: str | None = Field(None, description="config.json's first architecture.")
    num_layers: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)
    num_kv_heads: int = Field(..., ge=1)
    head_dim: int = Field(..., ge=1)
    kv_dtype: str = Field(..., description="dtype of the KV cache: the model's torch_dtype unless overridden.")
    kv_dtype_bytes: int = Field(..., ge=1)
    max_model_len: int | None = Field(None, description="config.json's max_position_embeddings.")

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """A dumped profile carries its computed fields; reading it back recomputes them."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in ("weights_gib", "kv_bytes_per_token")}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weights_gib(self) -> float:
        return round(self.weight_bytes / GIB, 3)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across every layer: layers x KV heads x head dim x 2 x dtype bytes."""
        return self.kv_bytes_per_token_as(self.kv_dtype_bytes)

    def kv_bytes_per_token_as(self, dtype_bytes: int) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes

    def memory_bytes(self, context_len: int | None = None, batch: int = 1, kv_dtype: str | None = None) -> int:
        """Weights plus the KV cache of `batch` sequences of `context_len` tokens each.

        There is no overhead term: activations, CUDA graphs and the engine's runtime depend
        on the engine and device, not on the model, so placement adds its own headroom.
        `context_len` defaults to the model's max_model_len; `kv_dtype` overrides the KV
        cache dtype (vLLM's `kv_cache_dtype`, e.g. fp8, or an engine `dtype`)."""
        tokens = context_len if context_len is not None else self.max_model_len
        if tokens is None or tokens < 1:
            raise InvalidRequest(f"context_len must be a positive number of tokens (got {context_len})")
        if batch < 1:
            raise InvalidRequest(f"batch must be at least 1 (got {batch})")
        per_token = self.kv_bytes_per_token_as(kv_dtype_bytes(kv_dtype)) if kv_dtype else self.kv_bytes_per_token
        return self.weight_bytes + per_token * tokens * batch


def kv_dtype_bytes(dtype: str) -> int:
    name = dtype.removeprefix("torch.")
    if name not in KV_DTYPE_BYTES:
        raise InvalidRequest(f"unknown KV cache dtype {dtype!r}; known: {sorted(KV_DTYPE_BYTES)}", param="kv_dtype")
    return KV_DTYPE_BYTES[name]


# --------------------------------------------------------------------------- safetensors headers


class _Weights:
    """Running totals over every tensor of every shard."""

    def __init__(self) -> None:
        self.by_dtype: dict[str, int] = {}
        self.params = 0
        self.tensors = 0

    def add_shard(self, read: ReadRange, size: int, where: str) -> None:
        """Check one shard's header against the file and add its tensors."""
        header, data_start = _read_header(read, size, where)
        header.pop("__metadata__", None)
        data_end = data_start
        for name, entry in header.items():
            code, shape, (start, end) = _tensor_entry(entry, f"{where}: tensor {name!r}")
            dtype, itemsize = SAFETENSORS_DTYPES[code]
            count = math.prod(shape)
            if end - start != count * itemsize:
                raise InvalidRequest(
                    f"{where}: tensor {name!r} spans {end - start} B but shape {shape} of {code} is "
                    f"{count * itemsize} B"
                )
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + end - start
            self.params += count
            self.tensors += 1
            data_end = max(data_end, data_start + end)
        if data_end != size:
            raise InvalidRequest(f"{where}: tensors end at byte {data_end} but the file has {size} B")

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())

    def dominant(self) -> str:
        return max(sorted(self.by_dtype), key=lambda d: self.by_dtype[d])


def _read_header(read: ReadRange, size: int, where: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts: one or two ranged reads."""
    if size < 8:
        raise InvalidRequest(f"{where}: {size} B is too small to be safetensors")
    head = read(0, min(size, _FIRST_READ))
    (length,) = struct.unpack("<Q", head[:8])
    if length > _MAX_HEADER or 8 + length > size:
        raise InvalidRequest(f"{where}: header length {length} does not fit a {size} B file")
    if len(head) < 8 + length:
        head += read(len(head), 8 + length)
    try:
        header = json.loads(head[8 : 8 + length])
    except ValueError as exc:
        raise InvalidRequest(f"{where}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidRequest(f"{where}: header is not a JSON object")
    return header, 8 + length


def _tensor_entry(entry: Any, where: str) -> tuple[str, list[int], tuple[int, int]]:
    try:
        code, shape, offsets = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        start, end = int(offsets[0]), int(offsets[1])
    except (KeyError, TypeError, ValueError, IndexError):
        raise InvalidRequest(f"{where}: needs dtype, shape and data_offsets (got {entry!r})") from None
    if code not in SAFETENSORS_DTYPES:
        raise InvalidRequest(f"{where}: unknown dtype {code!r}")
    if min(shape, default=0) < 0 or not 0 <= start <= end:
        raise InvalidRequest(f"{where}: bad shape {shape} or data_offsets {offsets}")
    return code, shape, (start, end)


# --------------------------------------------------------------------------- config.json


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal checkpoints nest the language model's shape under text_config."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return {**config, **config["text_config"]}
    return config


def _shape_from_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    c = _text_config(config)

    def need(key: str) -> int:
        value = c.get(key)
        if not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"{where}: {key} must be a positive integer (got {value!r})")
        return value

    layers, heads = need("num_hidden_layers"), need("num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or need("hidden_size") // heads
    archs = c.get("architectures") or [None]
    return {
        "architecture": archs[0],
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "max_model_len": c.get("max_position_embeddings"),
        "torch_dtype": c.get("torch_dtype") or c.get("dtype"),
    }


# --------------------------------------------------------------------------- sources


def _build(
    read_file: Callable[[str], bytes], shards: list[tuple[str, int, ReadRange]], where: str, kv_dtype: str | None
) -> ResourceProfile:
    try:
        config = json.loads(read_file(CONFIG_NAME))
    except ValueError as exc:
        raise InvalidRequest(f"{where}/{CONFIG_NAME} is not JSON ({exc})") from None
    shape = _shape_from_config(config, f"{where}/{CONFIG_NAME}")
    weights = _Weights()
    for name, size, read in shards:
        weights.add_shard(read, size, f"{where}/{name}")
    dtype = weights.dominant()
    model_dtype = shape.pop("torch_dtype")
    if model_dtype in (None, "auto"):  # no declared dtype: the KV cache follows the weights
        model_dtype = dtype
    kv = kv_dtype or str(model_dtype)
    return ResourceProfile(
        weight_bytes=weights.total,
        dtype=dtype,
        dtypes=weights.by_dtype,
        num_params=weights.params,
        num_tensors=weights.tensors,
        num_shards=len(shards),
        kv_dtype=kv.removeprefix("torch."),
        kv_dtype_bytes=kv_dtype_bytes(kv),
        **shape,
    )


def shard_names(names: list[str], read_index: Callable[[], bytes] | None) -> list[str]:
    """The checkpoint's safetensors files: the index's, else every top-level *.safetensors."""
    if read_index is not None:
        try:
            return sorted(set(json.loads(read_index())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequest(f"{INDEX_NAME} has no usable weight_map ({exc!r})") from None
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)


def profile_from_dir(path: str | Path, kv_dtype: str | None = None) -> ResourceProfile:
    """The profile of a model directory (a snapshot, a demo build, any HF-style checkpoint)."""
    root = Path(path).expanduser()
    if not (root / CONFIG_NAME).is_file():
        raise InvalidRequest(f"{root} has no {CONFIG_NAME}")
    index = root / INDEX_NAME
    names = shard_names([p.name for p in root.iterdir()], index.read_bytes if index.is_file() else None)
    if not names:
        raise InvalidRequest(f"{root} holds no *.safetensors files")
    shards = []
    for name in names:
        file = root / name
        if not file.is_file():
            raise InvalidRequest(f"{root}: {INDEX_NAME} names {name}, which is missing")
        shards.append((name, file.stat().st_size, _file_reader(file)))
    return _build(lambda n: (root / n).read_bytes(), shards, str(root), kv_dtype)


def _file_reader(file: Path) -> ReadRange:
    def read(start: int, end: int) -> bytes:
        with open(file, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    return read


def profile_from_store(store: ModelStore, manifest: Manifest, kv_dtype: str | None = None) -> ResourceProfile:
    """The profile of a stored version, read with ranged reads from the fastest tier holding each blob."""
    files = {f.name: f for f in manifest.files}
    where = f"store://{manifest.ref}"
    if CONFIG_NAME not in files:
        raise InvalidRequest(f"{where} has no {CONFIG_NAME}")
    reader = _StoreReader(store)

    def read_file(name: str) -> bytes:
        f = files[name]
        return reader.read(f.sha256, 0, f.size)

    read_index = (lambda: read_file(INDEX_NAME)) if INDEX_NAME in files else None
    names = shard_names(list(files), read_index)
    if not names:
        raise InvalidRequest(f"{where} holds no *.safetensors files")
    missing = [n for n in names if n not in files]
    if missing:
        raise InvalidRequest(f"{where}: {INDEX_NAME} names files the manifest lacks: {missing}")
    shards = [(n, files[n].size, reader.ranged(files[n].sha256)) for n in names]
    return _build(read_file, shards, where, kv_dtype)


class _StoreReader:
    """Ranged reads of blobs, each from the fastest tier that holds it."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._tier: dict[str, Tier] = {}

    def _find(self, digest: str) -> Tier:
        if digest not in self._tier:
            tier = next((t for t in self.store.tiers if t.stat(digest) is not None), None)
            if tier is None:
                raise BlobNotFound(f"blob {digest[:12]} is in no tier of the store")
            self._tier[digest] = tier
        return self._tier[digest]

    def read(self, digest: str, start: int, end: int) -> bytes:
        return self._find(digest).read_range(digest, start, end)

    def ranged(self, digest: str) -> ReadRange:
        return lambda start, end: self.read(digest, start, end)
