"""`GET /metrics` on the ingress: the head node's Ray metrics export, as Prometheus scrapes it.

Ray's metrics agent on each node serves every Ray worker's metrics of that node (Helios's,
vLLM's through its Ray stat logger, Ray's and Serve's own) on its metrics export port; the
node list in the GCS says where. A single-node deployment is scraped at the ingress with
nothing else set up; on KubeRay, Prometheus scrapes each pod's export port directly.
"""

from __future__ import annotations

import time

import httpx

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_URL_TTL_S = 60.0


class HeadMetrics:
    """Fetches the head node's metrics export (its address is looked up once a minute)."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._looked_up = 0.0
        self._client = httpx.AsyncClient(timeout=10.0)

    def _head_url(self) -> str | None:
        if self._url is None or time.monotonic() - self._looked_up > _URL_TTL_S:
            import ray

            heads = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
            node = heads[0] if heads else None
            port = node.get("MetricsExportPort") if node else None
            self._url = f"http://{node['NodeManagerAddress']}:{port}/metrics" if port else None
            self._looked_up = time.monotonic()
        return self._url

    async def text(self) -> str:
        """The exposition text; raises OSError when the head's agent does not answer."""
        url = self._head_url()
        if url is None:
            raise OSError("the head node exports no metrics (Ray's metrics agent is not running)")
        try:
            resp = await self._client.get(url)
        except httpx.HTTPError as exc:
            self._url = None  # look it up again next time: the agent may have restarted elsewhere
            raise OSError(f"Ray's metrics export at {url}: {exc}") from exc
        if resp.status_code != 200:
            raise OSError(f"Ray's metrics export at {url}: HTTP {resp.status_code}")
        return resp.text
