"""The transfer's sha256 runs on a thread of its own: same digest, errors reach the caller, no thread left."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from helios.storage.transfer import HashThread


def test_the_hash_thread_gives_the_stream_digest_and_ends() -> None:
    chunks = [os.urandom(n) for n in (1 << 20, 7, 3 << 20, 0, 12345)]
    hasher = HashThread(hashlib.sha256(), depth=2)
    for c in chunks:
        hasher.update(memoryview(c))
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert not any(t.name == "helios-hash" and t.is_alive() for t in threading.enumerate())
    hasher.close()  # again: a no-op


def test_a_hashing_error_reaches_the_transfer() -> None:
    hasher = HashThread(hashlib.sha256())
    hasher.update("not bytes")
    with pytest.raises(TypeError):
        hasher.hexdigest()
