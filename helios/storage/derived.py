"""Derived blobs: a model's weights in vLLM's own parameter layout, so replicas can share them.

vLLM fuses checkpoint tensors while loading (q/k/v into qkv_proj, gate/up into gate_up_proj),
so its parameters cannot alias the checkpoint file. The first load on a node therefore writes
the parameters, as `load_weights` left them, into one safetensors file in Helios's cache
(atomically: temp file, then `os.replace`). Every later load maps that file MAP_SHARED and
read-only and points each parameter's `.data` at its pages: N replicas, one copy in the page
cache. On the CPU vLLM would then repack linear weights for oneDNN (a private copy per
replica), so for a shared model the plain `torch.nn.functional.linear` path is chosen instead.

The blob holds the state *before* `process_weights_after_loading`, which is then re-run on
every load: post-processing need not be idempotent, and on the CPU its only large effect (the
repack) is exactly what sharing turns off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from helios.config import default_cache_root
from helios.observability.logs import get_logger, log_event
from helios.storage.loader import DTYPE_CODES, MappedSafetensors, safetensors_files
from helios.storage.manifest import MANIFEST_NAME, snapshot_digest

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

    from helios.storage.loader import HeliosModelLoader

logger = get_logger("storage.derived")

FORMAT_VERSION = 2  # bump when the blob's layout or the key's meaning changes
_SAMPLE_BYTES = 1 << 16


def derived_dir(configured: str | None) -> Path:
    """Where derived blobs live: the configured dir, else `$HELIOS_CACHE_ROOT/derived`."""
    if configured:
        return Path(configured).expanduser()
    return default_cache_root() / "derived"


def model_digest(model_dir: str | os.PathLike[str]) -> str:
    """A digest of the model's bytes that costs almost no I/O.

    With a Helios manifest (content digests of every file) it is the manifest's hash. Without
    one: config.json, plus each safetensors file's name, size, header and a sample of its data
    from both ends — cheap, because a hit must not read (and so pull into the page cache) the
    checkpoint it replaces, and enough to tell apart two checkpoints of the same shape.
    """
    root = Path(model_dir)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        return snapshot_digest(manifest.read_bytes())
    h = hashlib.sha256()
    config = root / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in safetensors_files(root):
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = f.read(header_len)
            data = size - 8 - header_len
            head = f.read(min(_SAMPLE_BYTES, data))
            f.seek(max(8 + header_len, size - _SAMPLE_BYTES))
            tail = f.read()
        for part in (path.name.encode(), str(size).encode(), header, head, tail):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return "headers:" + h.hexdigest()


@dataclass(frozen=True)
class DerivedKey:
    """Everything the parameter layout depends on; two loads with equal keys get the same bytes."""

    model_digest: str
    architecture: str
    vllm_version: str
    dtype: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    # What else decides which modules vLLM builds and how it fills them: the resolved architecture,
    # runner and conversion (a pooling model has no lm_head), the implementation, and the config
    # after hf_overrides (hashed).
    model_class: str = ""
    runner: str = ""
    model_impl: str = ""
    hf_config: str = ""
    format_version: int = FORMAT_VERSION

    def file_name(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:40] + ".safetensors"

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def derived_key(model_dir: str, model_config: ModelConfig) -> DerivedKey:
    import vllm
    from vllm.distributed import (
        get_pipeline_model_parallel_rank,
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return DerivedKey(
        model_digest=model_digest(model_dir),
        architecture=",".join(model_config.architectures or []),
        vllm_version=vllm.__version__,
        dtype=str(model_config.dtype).removeprefix("torch."),
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=get_tensor_model_parallel_world_size(),
        pp_rank=get_pipeline_model_parallel_rank(),
        pp_size=get_pp_group().world_size,
        model_class=str(getattr(model_config, "architecture", "")),
        runner=f"{getattr(model_config, 'runner_type', '')}/{getattr(model_config, 'convert_type', '')}",
        model_impl=str(getattr(model_config, "model_impl", "")),
        hf_config=_config_digest(model_config.hf_config),
    )


def _config_digest(hf_config: object) -> str:
    """The model's config as vLLM built it (overrides applied), without where it was read from."""
    to_dict = getattr(hf_config, "to_dict", None)
    data = {k: v for k, v in (to_dict() if to_dict else vars(hf_config)).items() if k != "_name_or_path"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- blob I/O


def write_blob(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write `tensors` as safetensors at `path` atomically, streaming one tensor at a time.

    Tensors go widest dtype first, so every offset is aligned to its element size without
    padding (safetensors forbids holes). Returns the bytes written.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name in order:
                t = tensors[name].detach()
                if t.numel():
                    f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return 8 + len(header_bytes) + offset


def open_blob(path: Path, key: DerivedKey, shared: bool = True) -> MappedSafetensors | None:
    """The blob mapped (shared and read-only, else copy-on-write), or None when absent or written
    for another key."""
    try:
        blob = MappedSafetensors(path, shared=shared)
    except FileNotFoundError:
        return None
    except ValueError as e:  # not safetensors (damaged): treat as absent, the writer replaces it
        log_event(logger, "derived_blob_unreadable", path=str(path), error=str(e))
        return None
    if blob.metadata != key.metadata():
        log_event(logger, "derived_blob_stale", path=str(path))
        return None
    return blob


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """One writer per blob on the node: a replica that waited here then finds the blob written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            # A writer killed mid-write left its temp file; nobody else writes it while we hold the lock.
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def bind_parameters(model: nn.Module, blob: MappedSafetensors) -> int:
    """Point every parameter's `.data` at its pages in the blob (no copy); returns bytes bound."""
    bound = 0
    for name, param in model.named_parameters():  # tied parameters appear once
        if name not in blob.entries:
            raise KeyError(f"derived blob {blob.path} has no parameter {name}")
        view = blob.tensor(name)
        if view.shape != param.shape or view.dtype != param.dtype:
            raise ValueError(
                f"{name}: blob has {view.dtype}{tuple(view.shape)}, model wants {param.dtype}{tuple(param.shape)}"
            )
        param.data = view
        bound += blob.nbytes(name)
    return bound


# --------------------------------------------------------------------------- plain CPU GEMM


@contextlib.contextmanager
def plain_cpu_gemm() -> Iterator[None]:
    """While active, vLLM's CPU GEMM dispatch keeps 2-D weights as they are and uses F.linear.

    `dispatch_cpu_unquantized_gemm` (called from the unquantized linear and embedding methods'
    `process_weights_after_loading`, which import it at call time) would otherwise hand the
    weight to oneDNN/SGL to repack into private memory and drop the original. Other weights
    (conv, MoE) go to vLLM's own dispatch unchanged.
    """
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim == 2:
            layer.cpu_linear = torch.nn.functional.linear
        else:
            original(layer, remove_weight)

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


# --------------------------------------------------------------------------- the shared load


def load_shared_model(
    loader: HeliosModelLoader, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str
) -> tuple[nn.Module, str, int]:
    """Build the model with its parameters on the shared blob; returns (model, "hit"|"written", bytes)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_dir = loader._model_dir(model_config)
    key = derived_key(model_dir, model_config)
    path = derived_dir(loader.options.derived_dir) / key.file_name()
    target_device = torch.device("cpu")
    with set_default_torch_dtype(model_config.dtype), target_device:
        model = loader.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)

    status = "hit"
    blob = open_blob(path, key)
    if blob is None:
        try:
            blob, status = _load_and_write(loader, model, model_config, path, key)
        except OSError as e:  # read-only or full cache: serve anyway, just unshared
            log_event(logger, "derived_blob_unavailable", level=logging.WARNING, path=str(path), error=str(e))
            if loader.stats.tensors == 0:
                loader.load_weights(model, model_config)
            process_weights_after_loading(model, model_config, target_device)
            return model.eval(), "none", loader.stats.bytes
    bound = bind_parameters(model, blob)  # the private copies from load_weights are freed here
    model._helios_derived_blob = blob  # keep the mapping's owner reachable from the model
    with plain_cpu_gemm():
        process_weights_after_loading(model, model_config, target_device)
    log_event(logger, "shared_weights_bound", path=str(path), bytes=bound, derived=status)
    return model.eval(), status, bound


def _load_and_write(
    loader: HeliosModelLoader, model: nn.Module, model_config: ModelConfig, path: Path, key: DerivedKey
) -> tuple[MappedSafetensors, str]:
    """Load the checkpoint the ordinary way and write the derived blob, unless a replica beat us to it."""
    with writer_lock(path):
        blob = open_blob(path, key)  # another replica may have written it while we waited
        if blob is not None:
            return blob, "hit"
        loader.load_weights(model, model_config)
        written = write_blob(path, dict(model.named_parameters()), key.metadata())
        log_event(logger, "derived_blob_written", path=str(path), bytes=written)
        blob = open_blob(path, key)
        if blob is None:
            raise FileNotFoundError(f"derived blob {path} vanished right after it was written")
        return blob, "written"
