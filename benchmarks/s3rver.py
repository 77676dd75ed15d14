"""A local S3 server for the benchmarks: s3rver (Node.js) on a loopback port.

s3rver keeps objects as plain files under a data directory and accepts any credentials,
so the "remote tier" of a cold start can be measured on one machine with nothing outside
it. It is installed with npm into `benchmarks/.s3rver/` (git-ignored) on first use.

    with s3rver.running() as s3:
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.put(local_dir, f"{s3.bucket}/prefix", recursive=True)

    python benchmarks/s3rver.py [--mib 512]   # s3fs get vs concurrent ranged GETs against it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = HERE / ".s3rver"
BIN = PREFIX / "node_modules" / ".bin" / "s3rver"
KEY = SECRET = "S3RVER"  # s3rver's own defaults; it accepts any


@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    bucket: str
    directory: Path
    pid: int
    version: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __iter__(self):  # endpoint_url, key, secret, bucket = server
        return iter((self.endpoint_url, self.key, self.secret, self.bucket))

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for `s3fs.S3FileSystem` (and fsspec `storage_options`)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    @property
    def env(self) -> dict[str, str]:
        """AWS SDK environment (boto3, botocore, pyarrow, the AWS CLI) pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def ensure_installed() -> Path:
    """npm-install s3rver into benchmarks/.s3rver/ unless it is there already."""
    if not BIN.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm not found: Node.js is needed to run s3rver")
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(PREFIX), "s3rver@3"],
                       check=True, stdout=subprocess.DEVNULL)
    return BIN


def version() -> str:
    try:
        import json

        return json.loads((PREFIX / "node_modules" / "s3rver" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _free_port() -> int:
    from helios.ray_env import side_port

    return side_port()


def _kill_tree(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start(bucket: str = "helios-bench", directory: str | os.PathLike | None = None,
          log_path: str | os.PathLike | None = None, timeout_s: float = 30) -> S3Server:
    """Start s3rver on a free loopback port with `bucket` created; returns once it answers."""
    ensure_installed()
    directory = Path(directory or tempfile.mkdtemp(prefix="s3rver-"))
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [str(BIN), "--directory", str(directory), "--address", "127.0.0.1", "--port", str(port),
         "--silent", "--no-vhost-buckets", "--configure-bucket", bucket],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"s3rver exited with {proc.returncode} before answering")
        try:
            # An unsigned request is refused (403), but any HTTP answer means it is up.
            urllib.request.urlopen(f"{url}/{bucket}", timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                _kill_tree(proc)
                raise TimeoutError(f"s3rver did not answer on {url} within {timeout_s}s") from None
            time.sleep(0.1)
    return S3Server(url, KEY, SECRET, bucket, directory, proc.pid, version(), proc)


def stop(server: S3Server) -> None:
    if server.proc is not None:
        _kill_tree(server.proc)


@contextlib.contextmanager
def running(bucket: str = "helios-bench", directory: str | os.PathLike | None = None,
            log_path: str | os.PathLike | None = None) -> Iterator[S3Server]:
    """s3rver for the `with` block; unpacks as (endpoint_url, key, secret, bucket).

    A data directory it made itself is deleted afterwards; one passed in is kept.
    """
    own_dir = directory is None
    server = start(bucket, directory, log_path)
    try:
        yield server
    finally:
        stop(server)
        if own_dir:
            shutil.rmtree(server.directory, ignore_errors=True)


def ranged_get_gbps(server: S3Server, key: str, size: int, chunk: int, concurrency: int, repeats: int = 1) -> list[float]:
    """GB/s reading one object as `chunk`-byte ranged GETs, `concurrency` in flight (s3fs async)."""
    import asyncio

    import s3fs

    async def run() -> list[float]:
        fs = s3fs.S3FileSystem(**server.storage_options, asynchronous=True, skip_instance_cache=True)
        session = await fs.set_session()
        try:
            rates = []
            for _ in range(repeats):
                sem = asyncio.Semaphore(concurrency)

                async def get(off: int, sem: asyncio.Semaphore = sem) -> int:
                    async with sem:
                        data = await fs._cat_file(f"{server.bucket}/{key}", start=off, end=min(off + chunk, size))
                        return len(data)

                t = time.perf_counter()
                got = sum(await asyncio.gather(*(get(o) for o in range(0, size, chunk))))
                rates.append(size / (time.perf_counter() - t) / 1e9)
                assert got == size, (got, size)
            return rates
        finally:
            await session.close()

    return asyncio.run(run())


def main() -> None:
    import argparse
    import statistics

    import s3fs

    parser = argparse.ArgumentParser(description="Plain s3fs get vs concurrent ranged GETs against s3rver.")
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="s3rver-check-", dir=HERE) as tmp, running() as server:
        src = Path(tmp) / "blob"
        with open(src, "wb") as f:
            f.writelines(os.urandom(1 << 20) for _ in range(args.mib))
        fs = s3fs.S3FileSystem(**server.storage_options)
        fs.put_file(str(src), f"{server.bucket}/blob")
        plain = []
        for _ in range(args.repeats):
            dst = Path(tmp) / "got"
            t = time.perf_counter()
            fs.get_file(f"{server.bucket}/blob", str(dst))
            plain.append(size / (time.perf_counter() - t) / 1e9)
            dst.unlink()
        print(f"s3rver {server.version} on {server.endpoint_url}: {args.mib} MiB object, GB/s (median, all)")
        print(f"  s3fs get_file:                   {statistics.median(plain):.3f}  {[round(x, 3) for x in plain]}")
        for conc in (4, 8, 16):
            ranged = ranged_get_gbps(server, "blob", size, 16 << 20, conc, args.repeats)
            print(f"  16 MiB ranged GETs, {conc:2d} in flight: {statistics.median(ranged):.3f}  "
                  f"{[round(x, 3) for x in ranged]}")


if __name__ == "__main__":
    main()
