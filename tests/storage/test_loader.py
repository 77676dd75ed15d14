"""Helios's vLLM model loader: zero-copy mapped weights, same greedy outputs, shared weights across replicas."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from helios.cpu_features import cpu_dtype
from helios.storage import arrivals, derived
from helios.storage.loader import LoaderOptions, MappedSafetensors, iter_mapped_weights, safetensors_files
from helios.storage.manifest import MANIFEST_NAME
from tests.process_tree import kill_tree

PROBE = Path(__file__).with_name("loader_probe.py")
PROMPTS = [
    {"prompt": "Hello there", "max_tokens": 24},
    {"prompt": "The quick brown fox", "max_tokens": 24},
    {"prompt": "Helios serves models", "max_tokens": 24},
]
TINY = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "kv_cache_space_gib": 1}
# The bench model in the dtype this CPU runs natively: with bf16 emulated (no AVX-512 bf16 / AMX), vLLM's
# oneDNN path and the plain one a shared load takes round differently and greedy output drifts apart.
BENCH = {"dtype": cpu_dtype(), "max_model_len": 512, "enforce_eager": True, "kv_cache_space_gib": 1}
MIB = 1 << 20


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)  # the helios plug-in must load in every vLLM process
    return env


def run_probe(model_dir: Path, engine: dict[str, Any], prompts: list[dict], *args: str, timeout: float = 600) -> dict:
    """Run the probe to completion; returns its RESULT."""
    proc = subprocess.Popen(
        [sys.executable, str(PROBE), str(model_dir), json.dumps(engine), json.dumps(prompts), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise AssertionError(f"probe failed (rc={proc.returncode}):\n{out[-6000:]}")


class HeldEngine:
    """A probe kept alive after loading, so its processes' memory can be read."""

    def __init__(self, model_dir: Path, engine: dict[str, Any], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(model_dir), json.dumps(engine), json.dumps(PROMPTS[:1]), "--hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=_env(),
            start_new_session=True,
        )
        self.result: dict | None = None

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.result = json.loads(line.removeprefix("RESULT "))
            if line.strip() == "READY":
                return self.result or {}
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"engine did not get ready (rc={self.proc.poll()}); see {self.log.name}")

    def processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def close(self) -> None:
        """Let the probe exit on its own first (vLLM then removes its shared-memory queues), then kill what is left."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        kill_tree(self.proc)
        self.log.close()


def smaps(pid: int) -> list[tuple[str, dict[str, int]]]:
    """(path, {field: kB}) per mapping of a process, from /proc/PID/smaps."""
    mappings: list[tuple[str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                if mappings:
                    mappings[-1][1][head[0][:-1]] = int(head[1])
            elif "-" in head[0]:
                mappings.append((head[5] if len(head) > 5 else "", {}))
    return mappings


def memory_of(proc: psutil.Process, weight_dirs: list[Path]) -> dict[str, float]:
    """MiB of private memory in a process, in total and in mappings of files under `weight_dirs`."""
    prefixes = tuple(str(d) for d in weight_dirs)
    total = {"private": 0, "weights_private": 0, "weights_rss": 0}
    for path, fields in smaps(proc.pid):
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        total["private"] += private
        if path.startswith(prefixes):
            total["weights_private"] += private
            total["weights_rss"] += fields.get("Rss", 0)
    return {k: v / 1024 for k, v in total.items()}


def weights_holder(engine: HeldEngine, weight_dirs: list[Path]) -> tuple[psutil.Process, dict[str, float]]:
    """The process of the engine that holds the model: the one with the most private memory, or the mapping."""
    measured = [(p, memory_of(p, weight_dirs)) for p in engine.processes()]
    return max(measured, key=lambda pm: (pm[1]["weights_rss"], pm[1]["private"]))


# --------------------------------------------------------------------------- unit tests


def test_yielded_tensors_are_views_of_the_mapping_and_equal_safetensors(tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    [path] = safetensors_files(tiny_model_dir)
    expected = load_file(str(path))
    mapped = MappedSafetensors(path)
    start, end = mapped.address_range()
    assert end - start == path.stat().st_size
    seen = set()
    for name in mapped.names():
        t = mapped.tensor(name)
        ptr = t.untyped_storage().data_ptr()
        assert start <= ptr and ptr + t.numel() * t.element_size() <= end, name
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
        seen.add(name)
    assert seen == set(expected)


def test_loader_iterator_yields_views_of_its_mapping(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `load_weights` hands vLLM: every tensor lies inside the file's mapping, equal to safetensors."""
    from safetensors.torch import load_file

    import helios.storage.loader as loader_module

    opened: list[MappedSafetensors] = []

    class Recording(MappedSafetensors):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(loader_module, "MappedSafetensors", Recording)
    [path] = safetensors_files(tiny_model_dir)
    expected = load_file(str(path))
    got = dict(iter_mapped_weights([path]))
    [mapped] = opened
    start, end = mapped.address_range()
    for name, t in got.items():
        ptr = t.untyped_storage().data_ptr()
        assert start <= ptr and ptr + t.numel() * t.element_size() <= end, name
        assert torch.equal(t, expected[name]), name
    assert got.keys() == expected.keys()


def test_snapshot_symlinks_are_resolved(tiny_model_dir: Path, tmp_path: Path) -> None:
    [path] = safetensors_files(tiny_model_dir)
    link = tmp_path / "model.safetensors"
    link.symlink_to(path)
    assert MappedSafetensors(link).path == str(path.resolve())


def test_all_dtypes_map_as_views(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i64": torch.arange(5, dtype=torch.int64),
        "u8": torch.arange(9, dtype=torch.uint8),
        "scalar": torch.tensor(1.5),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    got = dict(iter_mapped_weights([tmp_path / "m.safetensors"]))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_streaming_to_the_gpu_is_exact(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from helios.storage.loader import stream_to_device

    tensors = {"big": torch.randn(3, 1 << 20), "bf16": torch.randn(1000).to(torch.bfloat16), "empty": torch.empty(0, 4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    device = torch.device("cuda", torch.cuda.current_device())
    # 1 MiB chunks: the 12 MiB tensor cycles both staging buffers several times.
    got = dict(stream_to_device(iter_mapped_weights([tmp_path / "m.safetensors"]), device, chunk_mib=1))
    torch.cuda.synchronize()
    for name, t in tensors.items():
        assert got[name].device == device and torch.equal(got[name].cpu(), t), name


def test_derived_blob_round_trips_and_is_plain_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "a.weight": torch.randn(8, 4),
        "b.weight": torch.randn(3).to(torch.bfloat16),
        "c": torch.arange(3, dtype=torch.uint8),
    }
    path = tmp_path / "blob.safetensors"
    written = derived.write_blob(path, tensors, {"k": "v"})
    assert written == path.stat().st_size
    assert {k: v for k, v in load_file(str(path)).items()}.keys() == tensors.keys()
    blob = MappedSafetensors(path, shared=True)
    assert blob.metadata == {"k": "v"}
    for name, t in tensors.items():
        assert torch.equal(blob.tensor(name), t)
    assert [p.name for p in tmp_path.iterdir()] == ["blob.safetensors"]  # no temp file left


def test_blob_with_another_key_is_not_used(tmp_path: Path) -> None:
    key = derived.DerivedKey("m", "Llama", "0.32.0", "float32", 0, 1, 0, 1)
    path = tmp_path / key.file_name()
    derived.write_blob(path, {"w": torch.ones(2)}, key.metadata())
    assert derived.open_blob(path, key) is not None
    other = derived.DerivedKey("m", "Llama", "0.32.0", "bfloat16", 0, 1, 0, 1)
    assert other.file_name() != key.file_name()
    assert derived.open_blob(path, other) is None
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")  # damaged
    assert derived.open_blob(path, key) is None


def test_model_digest_prefers_the_manifest_and_sees_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    base = derived.model_digest(copy)
    assert base.startswith("headers:") and base == derived.model_digest(tiny_model_dir)
    with open(copy / "model.safetensors", "r+b") as f:  # same shapes, different last bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04")
    assert derived.model_digest(copy) != base
    (copy / MANIFEST_NAME).write_text('{"files": []}')
    assert derived.model_digest(copy).startswith("manifest:")


def test_derived_dir_defaults_under_the_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HELIOS_CACHE_ROOT", str(tmp_path))
    assert derived.derived_dir(None) == tmp_path / "derived"
    assert derived.derived_dir("/x/y") == Path("/x/y")


def test_the_layout_fingerprint_sees_writes_anywhere_but_not_replaced_data() -> None:
    """The layout cache writes a parameter only if post-processing left it as loaded: transforms
    through `.data` (no version bump) of the whole tensor or of a span of it must show; a parameter
    whose `.data` was swapped for a new tensor (vLLM's repacks) leaves the snapshot as it was.
    (Sampled, so a change of a few scattered bytes could pass unseen.)"""
    from helios.storage.layout_cache import _fingerprint

    param = torch.nn.Parameter(torch.arange(1 << 20, dtype=torch.float32), requires_grad=False)
    snapshot = param.detach()
    before = _fingerprint(snapshot)
    param.data = torch.zeros(4)  # replaced, as vLLM's CPU repack does
    assert _fingerprint(snapshot) == before
    param.data = snapshot
    param.data[300_000:600_000] = -1.0  # a span, in place, through .data
    assert _fingerprint(snapshot) != before
    param.data.copy_(torch.arange(1 << 20, dtype=torch.float32))
    assert _fingerprint(snapshot)[1:] == before[1:]  # the bytes are back (the version moved)
    param.data.mul_(2)  # a whole-tensor transform
    assert _fingerprint(snapshot)[2] != before[2]


def test_plain_cpu_gemm_skips_the_repack_and_restores_vllm() -> None:
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    layer = torch.nn.Linear(64, 32, bias=False)
    weight = layer.weight
    with derived.plain_cpu_gemm():
        layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer_utils.dispatch_cpu_unquantized_gemm is original
    assert layer.weight is weight and layer.cpu_linear is torch.nn.functional.linear


def test_loader_options_reject_unknown_keys() -> None:
    assert LoaderOptions.parse({"share_weights": True}).share_weights
    with pytest.raises(ValueError, match="unknown"):
        LoaderOptions.parse({"share_weight": True})


def test_plugin_registers_the_load_format_idempotently() -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    from helios.storage import plugin
    from helios.storage.loader import HeliosModelLoader

    plugin.register()
    plugin.register()
    loader = get_model_loader(LoadConfig(load_format="helios", model_loader_extra_config={"share_weights": True}))
    assert isinstance(loader, HeliosModelLoader) and loader.options.share_weights


# --------------------------------------------------------------------------- engine tests


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    """vLLM's own greedy tokens for PROMPTS on the tiny model, with its default loader."""
    tokens = run_probe(tiny_model_dir, TINY, PROMPTS)["tokens"]
    assert all(len(t) > 0 for t in tokens)
    return tokens


@pytest.mark.integration
def test_greedy_outputs_equal_the_default_loader(
    tiny_model_dir: Path, tmp_path: Path, reference: list[list[int]]
) -> None:
    report = tmp_path / "report.json"
    plain = run_probe(
        tiny_model_dir,
        {**TINY, "load_format": "helios", "model_loader_extra_config": {"report_path": str(report)}},
        PROMPTS,
    )
    assert plain["tokens"] == reference
    loaded = json.loads(report.read_text())
    assert loaded["derived"] == "none" and loaded["share_weights"] is False
    assert loaded["bytes"] == sum(p.stat().st_size for p in safetensors_files(tiny_model_dir)) - _header_bytes(
        tiny_model_dir
    )

    extra = {"share_weights": True, "derived_dir": str(tmp_path / "derived"), "report_path": str(report)}
    for expected in ("written", "hit"):
        shared = run_probe(
            tiny_model_dir, {**TINY, "load_format": "helios", "model_loader_extra_config": extra}, PROMPTS
        )
        assert shared["tokens"] == reference, expected
        assert json.loads(report.read_text())["derived"] == expected
    assert len(list((tmp_path / "derived").glob("*.safetensors"))) == 1

    # The layout cache writes only once the engine serves (its serving marker appears): an engine
    # that exits without answering leaves nothing behind, not even a partial blob.
    layout = tmp_path / "layout"
    never = {"layout_cache": True, "derived_dir": str(layout), "report_path": str(report),
             "serving_path": str(tmp_path / "never-serving")}
    held = run_probe(tiny_model_dir, {**TINY, "load_format": "helios", "model_loader_extra_config": never}, PROMPTS)
    assert held["tokens"] == reference
    assert json.loads(report.read_text())["derived"] == "writing"
    assert not list(layout.glob("*.safetensors")) and not list(layout.glob(".*.tmp"))
    # Once it serves, the first start's write goes ahead (before its process exits); the next maps
    # that blob and runs vLLM's repack on it.
    serving = tmp_path / "serving"
    serving.touch()
    extra = {"layout_cache": True, "derived_dir": str(layout), "report_path": str(report), "serving_path": str(serving)}
    for expected in ("writing", "hit"):
        cached = run_probe(tiny_model_dir, {**TINY, "load_format": "helios", "model_loader_extra_config": extra}, PROMPTS)
        assert cached["tokens"] == reference, expected
        assert json.loads(report.read_text())["derived"] == expected
    [blob] = layout.glob("*.safetensors")
    assert MappedSafetensors(blob).metadata["dtype"] == TINY["dtype"]
    assert not list(layout.glob(".*.tmp"))


@pytest.mark.integration
def test_an_engine_started_before_its_weights_arrive_waits_for_them_and_answers_the_same(
    tiny_model_dir: Path, tmp_path: Path, reference: list[list[int]]
) -> None:
    """What a cold start with `transfer.overlap_engine_start` does: the snapshot's weight links dangle
    and a fetch is marked in progress; the engine starts, its loader waits, the weights land."""
    snap, blobs = tmp_path / "snap", tmp_path / "blobs"
    snap.mkdir()
    blobs.mkdir()
    weights = safetensors_files(tiny_model_dir)
    for f in tiny_model_dir.iterdir():
        if f not in weights and f.is_file():
            shutil.copy(f, snap / f.name)
    for w in weights:
        (snap / w.name).symlink_to(blobs / w.name)
    marker = snap / arrivals.marker_name()
    marker.touch()
    report = tmp_path / "report.json"
    engine = {**TINY, "load_format": "helios", "model_loader_extra_config": {"report_path": str(report)}}
    log = tmp_path / "probe.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(snap), json.dumps(engine), json.dumps(PROMPTS)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "waiting_for_weights" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "the engine never reached the weights"
            time.sleep(0.2)
        time.sleep(1.0)  # the loader keeps waiting while the marker says a fetch is on its way
        assert proc.poll() is None
        for w in weights:  # as the store lands a blob: whole, under its final name at once
            shutil.copy(w, blobs / f".{w.name}.part")
            os.replace(blobs / f".{w.name}.part", blobs / w.name)
        arrivals.mark_arrived(marker)
        proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    out = log.read_text()
    [result] = [json.loads(line.removeprefix("RESULT ")) for line in out.splitlines() if line.startswith("RESULT ")]
    assert result["tokens"] == reference
    assert json.loads(report.read_text())["waited_s"] >= 1.0


def test_a_loader_waiting_for_weights_gets_the_fetchs_error_or_a_missing_file(tmp_path: Path) -> None:
    link = tmp_path / "model.safetensors"
    link.symlink_to(tmp_path / "blob")
    with pytest.raises(FileNotFoundError, match="no fetch is bringing it"):
        arrivals.wait_for(link, tmp_path)
    marker = tmp_path / arrivals.marker_name()
    marker.touch()
    threading.Timer(0.3, arrivals.mark_failed, (marker, "BlobNotFound: blob 0123 is in no tier")).start()
    started = time.monotonic()
    with pytest.raises(arrivals.WeightsNotArrived, match="model.safetensors did not arrive: BlobNotFound"):
        arrivals.wait_for(link, tmp_path)
    assert time.monotonic() - started >= 0.3
    assert not marker.exists()


def _header_bytes(model_dir: Path) -> int:
    return sum(MappedSafetensors(p).data_start for p in safetensors_files(model_dir))


# --------------------------------------------------------------------------- shared-weights memory


@pytest.fixture(scope="module")
def shm_bench() -> Iterator[Path]:
    """The bench model (~1.4 GB bf16) in /dev/shm, as Helios's RAM tier would hold it; removed afterwards."""
    from helios.storage.demo_model import resolve_source

    source = resolve_source("demo://bench", Path.home() / ".cache" / "helios")
    root = Path(tempfile.mkdtemp(prefix="helios-test-", dir="/dev/shm"))
    try:
        shutil.copytree(source, root / "bench")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _two_replicas(root: Path, share: bool, tmp_path: Path) -> dict[str, Any]:
    """Start two engines one after the other; measure the second one's memory while both hold the model."""
    model = root / "bench"
    derived_root = root / ("derived-on" if share else "derived-off")
    extra = {"share_weights": share, "derived_dir": str(derived_root)}
    engine = {**BENCH, "load_format": "helios", "model_loader_extra_config": extra}
    first = HeldEngine(
        model,
        {**engine, "model_loader_extra_config": {**extra, "report_path": str(tmp_path / "r1.json")}},
        tmp_path / f"first-{share}.log",
    )
    second = None
    try:
        r1 = first.wait_ready()
        second = HeldEngine(
            model,
            {**engine, "model_loader_extra_config": {**extra, "report_path": str(tmp_path / "r2.json")}},
            tmp_path / f"second-{share}.log",
        )
        r2 = second.wait_ready()
        _, mem = weights_holder(second, [model, derived_root])
        return {
            "tokens_equal": r1["tokens"] == r2["tokens"],
            "tokens": r2["tokens"],
            "memory_mib": mem,
            "reports": [json.loads((tmp_path / f"r{i}.json").read_text()) for i in (1, 2)],
        }
    finally:
        for e in (second, first):
            if e is not None:
                e.close()


@pytest.mark.integration
def test_second_replica_shares_the_weights(shm_bench: Path, tmp_path: Path) -> None:
    # The weights as the engine holds them: the bf16 checkpoint's size, twice that in float32.
    weights_mib = sum(p.stat().st_size for p in safetensors_files(shm_bench / "bench")) / MIB
    weights_mib *= torch.finfo(getattr(torch, BENCH["dtype"])).bits / 16
    on = _two_replicas(shm_bench, True, tmp_path)
    off = _two_replicas(shm_bench, False, tmp_path)
    result = {
        "dtype": BENCH["dtype"],
        "weights_mib": round(weights_mib, 1),
        "share_on": on["memory_mib"],
        "share_off": off["memory_mib"],
        "share_on_reports": on["reports"],
        "share_off_reports": off["reports"],
        "private_saved_mib": round(off["memory_mib"]["private"] - on["memory_mib"]["private"], 1),
    }
    out = Path(os.environ.get("HELIOS_LOADER_MEMORY_JSON", tmp_path / "loader-memory.json"))
    out.write_text(json.dumps(result, indent=2))
    print("loader memory:", json.dumps(result))

    assert [r["derived"] for r in on["reports"]] == ["written", "hit"]
    assert on["tokens_equal"] and off["tokens_equal"] and on["tokens"] == off["tokens"]
    # The shared replica maps the whole derived blob, yet almost none of it is private to it ...
    assert on["memory_mib"]["weights_rss"] > 0.9 * weights_mib
    assert on["memory_mib"]["weights_private"] < weights_mib / 3
    # ... and in all it holds at least two thirds of the weights' size less private memory.
    assert result["private_saved_mib"] > 2 * weights_mib / 3


@pytest.mark.parametrize(("advice", "threads"), [("populate", 1), ("populate", 3), ("fallback", 1), ("fallback", 3)])
def test_read_ahead_brings_every_byte_with_or_without_populate_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, advice: str, threads: int
) -> None:
    """The read-ahead faults blocks in with MADV_POPULATE_READ, or reads them through a buffer where
    the kernel refuses the advice; either way the loader yields the file's exact tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    from helios.storage import loader

    if advice == "fallback":
        monkeypatch.setattr(loader, "MADV_POPULATE_READ", 0x7FFF)  # no such advice: EINVAL
    monkeypatch.setattr(loader.ReadAhead, "_BLOCK", 64 << 10)
    monkeypatch.setattr(loader, "READAHEAD_THREADS", threads)
    files = []
    for i in range(2):
        path = tmp_path / f"w{i}.safetensors"
        save_file({f"f{i}.t{j}": torch.randn(97, 131) for j in range(6)}, str(path))
        files.append(path)
    got = {f"{n}": t.clone() for n, t in loader.iter_mapped_weights(files, readahead_mib=1)}
    want = {n: t for f in files for n, t in load_file(str(f)).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # Left alone (no consumer to wait for), it goes through every byte of every file, and ends.
    ahead = loader.ReadAhead([str(f) for f in files], window=1 << 30, threads=threads)
    ahead._thread.join(timeout=30)
    assert not ahead._thread.is_alive()
    assert ahead._position == sum(f.stat().st_size for f in files)


def test_the_layout_writer_waits_for_the_serving_marker_or_its_limit(tmp_path: Path) -> None:
    from helios.storage import layout_cache

    marker = tmp_path / "serving"
    released: list[float] = []
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: released.append(
        time.monotonic() if layout_cache.held_until_serving(str(marker), 30) else -1.0))
    waiter.start()
    time.sleep(0.5)
    assert not released  # no marker yet: still held
    marker.touch()
    waiter.join(5)
    assert released and 0.5 <= released[0] - started < 5
    t = time.monotonic()
    assert layout_cache.held_until_serving(str(tmp_path / "absent"), 0.3)  # the limit: write anyway
    assert 0.3 <= time.monotonic() - t < 3
    assert layout_cache.held_until_serving(None)  # no marker configured: at once
