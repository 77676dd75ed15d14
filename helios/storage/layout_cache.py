"""The layout cache: a later start on a node maps the weights in vLLM's own layout instead of loading them.

Loading a checkpoint on the CPU copies every tensor into freshly allocated parameters, fusing
q/k/v and gate/up and converting to the engine's dtype; vLLM then repacks the linear weights
for oneDNN into memory of its own and drops the parameters. The first copy is the part a
cache can remove. After a start loads normally, its parameters as `load_weights` left them
are written (by a low-priority thread, after the engine has its repacked weights, so the start
does not wait) to a derived blob beside the tier the model loaded from (`derived.py`: same
key, same file as `share_weights` uses). The next start on the node maps that blob
copy-on-write, points every parameter at its pages and runs vLLM's post-processing as usual:
the repack reads straight from the tier's pages. Unlike `share_weights`, nothing about serving
changes (same kernels, same private packed weights); only the load does.

The blob must hold the state *before* post-processing, which is re-run on every load. The
snapshot is taken before it and written only if post-processing left every snapshotted tensor
as it was (version counter, shape and bytes sampled across it) and loading filled no buffer
(the blob holds parameters only); otherwise the start logs that the model cannot use the
cache and nothing is written. The write waits until the engine has answered its first request
(`LoaderOptions.serving_path` appears; at most `HOLD_MAX_S`): writing 1.4 GB of fresh pages
while the replica finishes its start and Serve brings it up slowed that start by seconds (a
pooled start from S3 spent them between the engine's start and its first token). Until the
blob is written the process holds the loaded parameters beside vLLM's packed copy: twice the
weights, from the load to the end of the write.
A blob that does not fit the model being built (a parameter missing or shaped otherwise) is
logged as stale and the checkpoint is loaded instead.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from helios.observability.logs import get_logger, log_event
from helios.storage.derived import (
    DerivedKey,
    bind_parameters,
    derived_dir,
    derived_key,
    open_blob,
    write_blob,
    writer_lock,
)
from helios.storage.loader import MADV_POPULATE_READ, MappedSafetensors

if TYPE_CHECKING:
    from pathlib import Path

    from vllm.config import ModelConfig, VllmConfig

    from helios.storage.loader import HeliosModelLoader

logger = get_logger("storage.layout_cache")

WRITER_NICE = 19  # the blob is written while the engine serves its first requests
EXIT_WAIT_S = 120.0  # an interpreter exit waits this long for a write in flight (vLLM kills a slow engine
# core 5 s after SIGTERM: that write is lost, its temp file removed by the next writer)
HOLD_MAX_S = 60.0  # the write begins after the engine's first answer, or this long after the load without one
_exiting = threading.Event()  # set at interpreter exit: a write still held back is dropped
_SAMPLES, _SAMPLE = 64, 64  # runs of bytes compared across a tensor (and at its end) to see it left alone


def load_with_layout_cache(
    loader: HeliosModelLoader, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str
) -> tuple[nn.Module, str, int]:
    """Build the model from the node's layout blob ("hit"), or load it normally and write the blob
    in the background ("writing"; "unusable" when loading fills buffers or post-processing changes
    the loaded tensors). Returns (model, status, bytes bound or loaded)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    key = derived_key(loader._model_dir(model_config), model_config)
    path = derived_dir(loader.options.derived_dir) / key.file_name()
    loader.stats.derived_path = str(path)
    device = torch.device("cpu")
    with set_default_torch_dtype(model_config.dtype), device:
        model = loader.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        blob = open_blob(path, key, shared=False)
        if blob is not None:
            try:
                bound = bind_parameters(model, blob)
            except (KeyError, ValueError) as e:  # a blob this build does not fit: load as if it were absent
                log_event(logger, "layout_cache_stale", level=logging.WARNING, path=str(path), error=str(e))
                model = loader.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            else:
                model._helios_layout_blob = blob  # parameters left after the repack still view its pages
                _populate(blob)
                process_weights_after_loading(model, model_config, device)
                log_event(logger, "layout_cache_hit", path=str(path), bytes=bound)
                return model.eval(), "hit", bound
        buffers = {name: _fingerprint(b) for name, b in model.named_buffers()}
        loader.load_weights(model, model_config)
        # The blob holds parameters only, as they were before post-processing, which every hit re-runs.
        filled = any(_fingerprint(b) != buffers.get(name) for name, b in model.named_buffers())
        snapshot = {name: p.detach() for name, p in model.named_parameters()}
        before = {name: _fingerprint(t) for name, t in snapshot.items()}
        process_weights_after_loading(model, model_config, device)
    why = None
    if filled:
        why = "loading the checkpoint filled buffers, which the blob does not hold"
    elif any(_fingerprint(t) != before[name] for name, t in snapshot.items()):
        why = "vLLM's post-processing changed loaded tensors in place"
    if why is not None:
        log_event(logger, "layout_cache_unusable", level=logging.WARNING, path=str(path), reason=why)
        return model.eval(), "unusable", loader.stats.bytes
    _start_writer(path, key, snapshot, loader.options.serving_path)
    return model.eval(), "writing", loader.stats.bytes


def _populate(blob: MappedSafetensors) -> None:
    """Map every page of the blob in one call: the repack would otherwise fault them in one by one
    (measured on the bench model: 0.1 s here, 0.5-0.8 s less repack)."""
    with contextlib.suppress(OSError, ValueError):  # before Linux 5.14: the repack faults them in
        blob.mm.madvise(MADV_POPULATE_READ)


def _fingerprint(t: torch.Tensor) -> tuple[int, tuple[int, ...], bytes]:
    """Version counter, shape and bytes sampled across the tensor: enough to see an in-place
    change (a write through `.data` does not move the version counter, hence the bytes)."""
    if not t.is_contiguous() or not t.numel() or t.device.type != "cpu":
        return t._version, tuple(t.shape), b""
    flat = t.reshape(-1).view(torch.uint8)
    step = max(len(flat) // _SAMPLES, 1)
    picks = torch.arange(0, len(flat), step)[:_SAMPLES]
    offsets = (picks.unsqueeze(1) + torch.arange(_SAMPLE)).clamp_(max=len(flat) - 1).reshape(-1)
    return t._version, tuple(t.shape), bytes(flat[offsets].numpy()) + bytes(flat[-_SAMPLE:].numpy())


def held_until_serving(serving_path: str | None, limit_s: float = HOLD_MAX_S) -> bool:
    """Wait until `serving_path` exists (the engine has answered), `limit_s` passes or the process
    exits; False when it exits first (nothing more should start)."""
    deadline = time.monotonic() + limit_s
    while serving_path is not None and not os.path.exists(serving_path) and time.monotonic() < deadline:
        if _exiting.wait(0.1):
            return False
    return not _exiting.is_set()


def _start_writer(path: Path, key: DerivedKey, tensors: dict[str, torch.Tensor], serving_path: str | None) -> None:
    """Write the blob on a thread at the lowest priority once the engine serves; the tensors are held
    until it is written."""

    def write() -> None:
        if not held_until_serving(serving_path):
            tensors.clear()
            return
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)  # this thread only
        with contextlib.suppress(OSError):  # vLLM pins its worker to its cores; at nice 19 this thread may use any
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        try:
            with writer_lock(path):
                if open_blob(path, key, shared=False) is not None:  # another engine on the node wrote it
                    return
                written = write_blob(path, tensors, key.metadata())
            log_event(logger, "layout_cache_written", path=str(path), bytes=written)
        except Exception as e:  # noqa: BLE001 - a full or read-only tier, or a dtype safetensors lacks: load normally next time
            log_event(logger, "layout_cache_unavailable", level=logging.WARNING, path=str(path), error=repr(e))
        finally:
            tensors.clear()

    thread = threading.Thread(target=write, name="helios-layout-cache-writer", daemon=True)
    thread.start()
    atexit.register(thread.join, EXIT_WAIT_S)
    atexit.register(_exiting.set)  # runs first (last registered): a write not begun is not begun at exit
