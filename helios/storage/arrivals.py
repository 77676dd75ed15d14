"""Weights still arriving: how an engine starts while its checkpoint is being fetched.

A cold start from S3 used to fetch every blob, then start the engine. Most of an engine's start
(its process, config, model construction) needs only the small files, so the store hands out
the snapshot once those are in and brings the weight files behind it. The snapshot directory
then holds a marker per fetch in progress; the loader, in the engine's own process, waits at
the first weight it reads until each file's link resolves, and fails with the fetch's own
error when a marker turns into a failure. Files on disk are the only channel because the
engine core is another process than the one fetching.

A fetch may also wait to be asked (`ModelStore.localize(..., only_if_wanted=...)`): when the
weights are expected not to be read at all (the node has fetched the model's layout blob,
`helios.storage.layout_share`), the loader that does need them leaves a `WANTED` file in the
snapshot and the fetch begins then; a start that never asks leaves the checkpoint in the remote tier.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

from helios.storage.tiers import atomic_write_bytes

ARRIVING = ".helios-arriving-"
FAILED = ".helios-failed-"
WANTED = ".helios-wanted"  # the loader reads weights: a fetch waiting to be asked begins
WEIGHT_SUFFIXES = (".safetensors",)  # what the Helios loader reads; everything else is needed to start


class WeightsNotArrived(RuntimeError):
    """The fetch bringing a weight file failed; the message is the fetch's own error."""


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def marker_name() -> str:
    return f"{ARRIVING}{uuid.uuid4().hex}"


def mark_failed(marker: Path, error: str) -> None:
    """Turn a fetch's marker into a failure that a waiting loader reports."""
    failed = marker.with_name(marker.name.replace(ARRIVING, FAILED, 1))
    atomic_write_bytes(failed, error.encode())
    marker.unlink(missing_ok=True)


def mark_arrived(marker: Path) -> None:
    marker.unlink(missing_ok=True)


def want(root: Path) -> None:
    """Ask a fetch that waits to be asked for the snapshot's weights to bring them now."""
    with contextlib.suppress(FileExistsError):
        (root / WANTED).touch(exist_ok=False)


def wanted(root: Path) -> bool:
    return (root / WANTED).exists()


def carried(root: Path) -> tuple[str, ...]:
    """What a snapshot linked again over `root` keeps of it: while a fetch is still in progress there,
    a loader's request for the weights (that fetch may be waiting to be asked). A request whose fetch
    is over is left behind: kept, it would fetch a checkpoint the next engine may never read."""
    return (WANTED,) if _markers(root, ARRIVING) else ()


def _markers(root: Path, prefix: str) -> list[Path]:
    try:
        return [root / n for n in os.listdir(root) if n.startswith(prefix)]
    except FileNotFoundError:
        return []


def wait_for(path: Path, root: Path, poll_s: float = 0.02) -> float:
    """Block until `path`, a link in the snapshot directory `root`, resolves; seconds waited.

    Raises `WeightsNotArrived` when the fetch failed, `FileNotFoundError` when no fetch is
    bringing it. Waits as long as a fetch is in progress: the fetch has its own timeouts."""
    started = time.monotonic()
    while not path.exists():
        for failed in _markers(root, FAILED):
            try:
                reason = failed.read_text()
            except FileNotFoundError:
                continue
            raise WeightsNotArrived(f"{path.name} did not arrive: {reason}")
        if not _markers(root, ARRIVING):
            if path.exists():  # arrived between the two looks
                break
            raise FileNotFoundError(f"{path} is missing and no fetch is bringing it")
        time.sleep(poll_s)
    return time.monotonic() - started
