"""Take docs/ray-dashboard-serve.png: the Ray dashboard's Serve page of a running `make serve`.

Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: Helios's clusters
use Ray's token authentication, so the dashboard needs the token as its cookie before the
page loads, which Chromium's command line cannot set.

    python docs/dashboard_screenshot.py [--url http://127.0.0.1:8265/#/serve] [--out docs/ray-dashboard-serve.png]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _token() -> str:
    """The cluster's token, as `ray get-auth-token` prints it (empty when auth is off)."""
    out = subprocess.run(["ray", "get-auth-token"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""


async def shoot(url: str, out: Path, wait_s: float, size: tuple[int, int]) -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(  # noqa: ASYNC220 - started once, before the loop has work
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/json") as r:
                            pages = [p for p in await r.json() if p["type"] == "page"]
                        break
                    except aiohttp.ClientError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.3)
                async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 1_000_000))

                    async def call(method: str, **params: object) -> dict:
                        n = next(ids)
                        await ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
                        async for msg in ws:
                            data = json.loads(msg.data)
                            if data.get("id") == n:
                                return data.get("result", {})
                        raise RuntimeError("the browser closed the connection")

                    if token := _token():
                        origin = url.split("/#")[0].rstrip("/")
                        await call("Network.setCookie", name="ray-authentication-token", value=token, url=origin)
                    await call("Page.navigate", url=url)
                    await asyncio.sleep(wait_s)  # the dashboard fills its tables over a few polls
                    shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(10)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8265/#/serve")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ray-dashboard-serve.png")
    parser.add_argument("--wait", type=float, default=12.0, help="Seconds the page gets to load.")
    args = parser.parse_args()
    asyncio.run(shoot(args.url, args.out, args.wait, (1500, 950)))


if __name__ == "__main__":
    main()
