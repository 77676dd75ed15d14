"""The registry's logic as a plain object: catalog, profiles, usage, warm view and store discovery.

The Ray actor (`actor.py`) only adds a lock, persistence and a flush thread around it, so
everything here is tested without Ray. Methods that read the store or model files
(`compute_profile`, `store_manifests`) touch no state, so the actor runs them outside
its lock and a slow S3 listing never stalls the router's calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helios.errors import HeliosError, InvalidRequest, ModelNotFound, ServiceUnavailable
from helios.observability.logs import get_logger, log_event
from helios.registry.catalog import Catalog, VersionRecord, check_ids, scale_settings
from helios.registry.prefetch import Prefetcher, Target, WarmTiers
from helios.registry.profile import CONFIG_NAME, ResourceProfile, profile_from_dir, profile_from_store
from helios.registry.usage import UsageBook
from helios.registry.warm import WarmView
from helios.storage.manifest import Manifest, parse_ref
from helios.storage.store import ARTEFACT_PREFIXES, ModelStore

logger = get_logger("registry")

STORE_SCHEME = "store://"


def store_source(model_id: str, version: str) -> str:
    return f"{STORE_SCHEME}{model_id}:{version}"


class RegistryCore:
    """Every piece of registry state and the rules that change it."""

    def __init__(
        self,
        catalog: Catalog | None = None,
        usage: UsageBook | None = None,
        warm: WarmView | None = None,
        store: ModelStore | None = None,
        cache_root: Path | None = None,
        sync_interval_s: float = 5.0,
        miss_sync_interval_s: float = 1.0,
        profile_retry_s: float = 10.0,
        prefetch_interval_s: float = 0.0,
        bandwidths: Mapping[str, float] | None = None,
        prefetch_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.catalog = catalog or Catalog()
        self.usage = usage or UsageBook()
        self.warm = warm or WarmView()
        self.store = store
        self.cache_root = cache_root
        self.sync_interval_s = sync_interval_s
        self.miss_sync_interval_s = miss_sync_interval_s
        self.profile_retry_s = profile_retry_s
        self.last_sync: float | None = None
        self._miss_synced: dict[str, float] = {}
        self._profile_tried: dict[tuple[str, str], float] = {}
        self.prefetch = Prefetcher(store, prefetch_interval_s, bandwidths)
        self.prefetch.seed(self.usage, prefetch_state)  # the saved histograms, then newer persisted requests

    # --- profiles (no state touched) ---
    def compute_profile(
        self, model_id: str, version: str, source: str, manifest: Manifest | None, strict: bool = True
    ) -> tuple[ResourceProfile | None, str | None]:
        """(profile, None), or (None, why) when the files cannot be reached yet.

        Files that are there but malformed raise InvalidRequest when `strict` (a register
        call should fail); a store sync records the reason instead."""
        try:
            return self._profile(model_id, version, source, manifest), None
        except InvalidRequest as exc:
            if strict:
                raise
            return None, f"{type(exc).__name__}: {exc}"
        except (HeliosError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a fault of ours on one version must not hide every other one from a sync
            if strict:
                raise
            log_event(logger, "registry_profile_failed", level=logging.ERROR, model=model_id, version=version,
                      error=repr(exc))
            return None, f"{type(exc).__name__}: {exc}"

    def _profile(self, model_id: str, version: str, source: str, manifest: Manifest | None) -> ResourceProfile:
        directory = self.local_dir(source)
        if directory is not None and (directory / CONFIG_NAME).is_file():
            return profile_from_dir(directory)
        if self.store is not None:
            manifest = manifest or self._stored_manifest(model_id, version, source)
            return profile_from_store(self.store, manifest)
        raise FileNotFoundError(f"{source}: no model files there yet, and no store to read them from")

    def local_dir(self, source: str) -> Path | None:
        """Where a source's files are on this node, if it names a directory (a demo model once built)."""
        if source.startswith(STORE_SCHEME) or (source.startswith("demo://") and self.cache_root is None):
            return None
        from helios.storage.demo_model import source_dir

        return source_dir(source, self.cache_root or Path())

    def _stored_manifest(self, model_id: str, version: str, source: str) -> Manifest:
        assert self.store is not None
        if source.startswith(STORE_SCHEME):
            ref_id, ref_version = parse_ref(source.removeprefix(STORE_SCHEME))
            return self.store.resolve(ref_id, ref_version or version)
        if source.startswith("demo://"):
            from helios.storage.sources import demo_version

            return self.store.resolve(model_id, demo_version(source.removeprefix("demo://")))
        return self.store.resolve(model_id, version)

    # --- catalog ---
    def new_record(
        self, model_id: str, version: str, source: str, manifest: Manifest | None, pinned: bool
    ) -> VersionRecord:
        """A version record with its profile computed (reads files; touches no state)."""
        check_ids(model_id, version)
        if manifest is not None and (manifest.model_id, manifest.version) != (model_id, version):
            raise InvalidRequest(
                f"manifest is for {manifest.ref}, not {model_id}:{version}", param="manifest"
            )
        profile, error = self.compute_profile(model_id, version, source, manifest)
        self._profile_tried[(model_id, version)] = time.time()
        return VersionRecord(
            version=version,
            source=source,
            manifest_digest=manifest.digest() if manifest else None,
            created=manifest.created if manifest else time.time(),
            pinned=pinned,
            profile=profile,
            profile_error=error,
        )

    def reusable(self, model_id: str, version: str, source: str, manifest: Manifest | None) -> VersionRecord | None:
        """The existing record if registering again changes nothing about its files (its profile stands)."""
        if not self.catalog.has(model_id, version):
            return None
        old = self.catalog.models[model_id].versions[version]
        digest = manifest.digest() if manifest else old.manifest_digest
        if old.source == source and old.manifest_digest == digest and old.profile is not None:
            return old
        return None

    def put(
        self,
        model_id: str,
        record: VersionRecord,
        make_default: bool = False,
        deploy: dict[str, Any] | None = None,
        scale: dict[str, int] | None = None,
    ) -> dict:
        settings = scale_settings(**scale) if scale is not None else None
        self.catalog.put(model_id, record, make_default, deploy, settings)
        log_event(
            logger, "model_registered", model=model_id, version=record.version, source=record.source,
            default=self.catalog.models[model_id].default_version == record.version,
            profile=record.profile is not None,
        )
        return self.version_dict(model_id, record.version)

    def delete(self, model_id: str, version: str | None = None) -> list[str]:
        refs = self.catalog.delete(model_id, version)
        if model_id not in self.catalog.models:
            self.usage.forget(model_id)
            self.warm.forget(model_id)
            self.prefetch.forget(model_id)
        log_event(logger, "model_deleted", model=model_id, version=version, refs=len(refs))
        return refs

    def set_default(self, model_id: str, version: str) -> dict:
        self.catalog.set_default(model_id, version)
        log_event(logger, "default_version_set", model=model_id, version=version)
        return self.version_dict(model_id, version)

    def set_scale(self, model_id: str, min_replicas: int, max_replicas: int) -> dict:
        settings = scale_settings(min_replicas, max_replicas)
        return self.catalog.set_scale(model_id, settings).model_dump()

    def scale(self, model_id: str) -> dict:
        return self.catalog.model(model_id).scale.model_dump()

    # --- usage and prefetch ---
    def record_requests(self, counts: dict[str, list[float]]) -> int:
        """Request timestamps (unix seconds) per model: into the usage history and the prefetch planner."""
        added = self.usage.record(counts)  # validates all before taking any
        self.prefetch.record(counts)
        return added

    def prefetch_inputs(self) -> tuple[list[tuple[str, VersionRecord]], WarmTiers, dict[str, list[str]]]:
        """A copy of what a prefetch round reads from registry state: each model's default version,
        the warm view's tiers per node, and the nodes running each model's replicas."""
        defaults = [(m, model.versions[model.default_version]) for m, model in sorted(self.catalog.models.items())
                    if model.default_version in model.versions]
        tiers = {n: {m: dict(k) for m, k in models.items()} for n, models in self.warm.state.tiers.items()}
        replicas = {m: sorted({e.node_id for e in r.values()}) for m, r in self.warm.state.replicas.items()}
        return defaults, tiers, replicas

    def prefetch_targets(self, defaults: list[tuple[str, VersionRecord]], tiers: WarmTiers) -> dict[str, Target]:
        """Manifests and fastest tiers of the models to plan for (reads the store; touches no state)."""
        return self.prefetch.targets(defaults, tiers, self._stored_manifest)

    # --- views ---
    def version_dict(self, model_id: str, version: str | None = None) -> dict:
        """A version record as JSON: {model_id, version, source, manifest_digest, created, registered,
        pinned, is_default, profile, profile_error}."""
        record = self.catalog.get(model_id, version)
        model = self.catalog.models[model_id]
        return {
            "model_id": model_id,
            **record.model_dump(mode="json"),
            "is_default": model.default_version == record.version,
        }

    def model_dict(self, model_id: str, now: float | None = None) -> dict:
        model = self.catalog.model(model_id)
        return {
            "id": model_id,
            "default_version": model.default_version,
            "pinned": model.pinned,
            "versions": [self.version_dict(model_id, v.version) for v in model.newest()],
            "usage": self.usage.summary(model_id, now),
            "warm": self.warm.of(model_id),
            "scale": model.scale.model_dump(),
            "deploy": dict(model.deploy),
        }

    def list_models(self, now: float | None = None) -> list[dict]:
        return [self.model_dict(m, now) for m in sorted(self.catalog.models)]

    def memory_needed(
        self, model_id: str, context_len: int | None, batch: int, version: str | None = None,
        kv_dtype: str | None = None,
    ) -> int:
        record = self.catalog.get(model_id, version)
        if record.profile is None:
            raise ServiceUnavailable(
                f"no resource profile yet for {model_id}:{record.version} ({record.profile_error})",
                retry_after_s=int(self.profile_retry_s),
            )
        return record.profile.memory_bytes(context_len, batch, kv_dtype)

    def warm_nodes(self, model_id: str, now: float | None = None) -> list[list[str]]:
        """Nodes that hold `model_id` locally, in groups from the warmest: nodes running a replica of
        it, then by the fastest local tier holding its blobs (the warm view's tier reports and the
        prefetch rounds' node reports). Warm-first placement prefers them in this order."""
        best: dict[str, float] = {}  # node -> read bytes/s of its fastest tier holding the model
        speeds = self.prefetch.planner.bandwidths  # the configured tiers' read rates, defaults by kind

        def offer(node: str, kind: str | None) -> None:
            if kind and kind != "remote":
                best[node] = max(best.get(node, 0.0), float(speeds.get(kind, 1.0)))

        for node, models in self.warm.state.tiers.items():
            for kind, size in models.get(model_id, {}).items():
                if size > 0:
                    offer(node, kind)
        for node, fastest in self.prefetch.node_reports(time.time() if now is None else now).items():
            offer(node, fastest.get(model_id))
        for entry in self.warm.state.replicas.get(model_id, {}).values():
            best[entry.node_id] = float("inf")  # its weights are mapped in memory there
        groups: dict[float, list[str]] = {}
        for node, speed in best.items():
            groups.setdefault(speed, []).append(node)
        return [sorted(groups[speed]) for speed in sorted(groups, reverse=True)]

    def expected_starts(self, horizon_s: float, now: float | None = None) -> dict[str, float]:
        """Node -> how many replica starts to expect within `horizon_s`: each model with no replica
        running, weighted by its chance of a request in that window (the prefetch planner's
        inter-arrival histograms), counted on the warmest node holding it, where warm-first
        placement puts it ("" when no node holds it). The engine pool sizes itself from this."""
        now = time.time() if now is None else now
        planner = self.prefetch.planner
        out: dict[str, float] = {}
        for model_id in sorted(self.catalog.models):
            usage = planner.usage.get(model_id)
            if usage is None or self.warm.state.replicas.get(model_id):
                continue
            p = usage.p_within(now, horizon_s, planner.min_gaps)
            if p <= 0:
                continue
            groups = self.warm_nodes(model_id, now)
            node = groups[0][0] if groups else ""
            out[node] = out.get(node, 0.0) + p
        return out

    def usage_of(self, model_id: str | None = None, now: float | None = None) -> dict:
        """One model's usage with its recent inter-arrival times, or every model's summary by id."""
        if model_id is None:
            ids = sorted(set(self.catalog.models) | set(self.usage.models))
            return {m: self.usage.summary(m, now) for m in ids}
        if model_id not in self.catalog.models and model_id not in self.usage.models:
            raise ModelNotFound(f"model {model_id!r} is not registered and has no usage", param="model")
        return {"model_id": model_id, **self.usage.detail(model_id, now)}

    # --- profiles missing at registration ---
    def profiles_to_retry(self, model_id: str | None = None, force: bool = False) -> list[tuple[str, VersionRecord]]:
        """Versions still without a profile whose last attempt is old enough to try again."""
        now = time.time()
        out = []
        for mid, model in self.catalog.models.items():
            if model_id is not None and mid != model_id:
                continue
            for record in model.versions.values():
                tried = self._profile_tried.get((mid, record.version), 0.0)
                if record.profile is None and (force or now - tried >= self.profile_retry_s):
                    out.append((mid, record))
        return out

    def retry_profile(self, model_id: str, record: VersionRecord) -> tuple[ResourceProfile | None, str | None]:
        """Compute a missing profile (reads files; touches no state but the attempt time)."""
        self._profile_tried[(model_id, record.version)] = time.time()
        manifest = None
        if record.source.startswith(STORE_SCHEME) and self.store is not None:
            manifest = self._find_manifest(model_id, record)
        return self.compute_profile(model_id, record.version, record.source, manifest, strict=False)

    def _find_manifest(self, model_id: str, record: VersionRecord) -> Manifest | None:
        try:
            return self._stored_manifest(model_id, record.version, record.source)
        except HeliosError:
            return None

    def set_profile(
        self, model_id: str, record: VersionRecord, profile: ResourceProfile | None, error: str | None
    ) -> bool:
        """Store a retried profile if the version is still the one it was computed for; True when it changed."""
        model = self.catalog.models.get(model_id)
        latest = model.versions.get(record.version) if model else None
        if latest is None or latest.source != record.source or latest.manifest_digest != record.manifest_digest:
            return False
        if latest.profile is not None or (profile is None and latest.profile_error == error):
            return False
        model.versions[record.version] = latest.model_copy(update={"profile": profile, "profile_error": error})
        return True

    def report_profile(self, model_id: str, version: str, profile: ResourceProfile) -> dict:
        """Take a profile computed where the files are (a replica on another node) for a version lacking one."""
        record = self.catalog.get(model_id, version)
        if record.profile is None:
            self.catalog.models[model_id].versions[version] = record.model_copy(
                update={"profile": profile, "profile_error": None}
            )
            log_event(logger, "profile_reported", model=model_id, version=version, weight_bytes=profile.weight_bytes)
        return self.version_dict(model_id, version)

    # --- store discovery ---
    def sync_due(self, model_id: str | None = None, now: float | None = None) -> bool:
        """Whether a (full, or one model's miss) sync may run now; marks it started if so."""
        if self.store is None:
            return False
        now = time.time() if now is None else now
        if model_id is None:
            if self.last_sync is not None and now - self.last_sync < self.sync_interval_s:
                return False
            self.last_sync = now
            return True
        if now - self._miss_synced.get(model_id, 0.0) < self.miss_sync_interval_s:
            return False
        if len(self._miss_synced) > 10_000:  # bounded: a flood of unknown ids must not grow it forever
            self._miss_synced.clear()
        self._miss_synced[model_id] = now
        return True

    def store_manifests(self, model_id: str | None = None) -> list[Manifest]:
        """Every manifest in the store (or one model's): reads the tiers, touches no state. The engines'
        artefacts the store keeps (compile caches, layout blobs) are not models: a request naming one
        finds nothing to register."""
        if self.store is None or (model_id or "").startswith(ARTEFACT_PREFIXES):
            return []
        try:
            return self.store.versions(model_id) if model_id else self.store.models()
        except HeliosError as exc:  # an unreachable remote must not fail a list or a resolve
            log_event(logger, "registry_sync_failed", model=model_id, error=str(exc))
            return []

    def unknown(self, manifests: list[Manifest]) -> list[Manifest]:
        """Manifests the catalog lacks (or holds at another digest, for versions it took from the store)."""
        out = []
        for m in manifests:
            if self.catalog.is_deleted(m.model_id, m.version):
                continue
            if not self.catalog.has(m.model_id, m.version):
                out.append(m)
                continue
            record = self.catalog.models[m.model_id].versions[m.version]
            if record.source == store_source(m.model_id, m.version) and record.manifest_digest != m.digest():
                out.append(m)  # pushed again with other files
        return out

    def synced_record(self, manifest: Manifest) -> VersionRecord:
        """A record for a version found in the store (reads its headers; touches no state)."""
        source = store_source(manifest.model_id, manifest.version)
        profile, error = self.compute_profile(manifest.model_id, manifest.version, source, manifest, strict=False)
        self._profile_tried[(manifest.model_id, manifest.version)] = time.time()
        return VersionRecord(
            version=manifest.version, source=source, manifest_digest=manifest.digest(), created=manifest.created,
            profile=profile, profile_error=error,
        )

    def add_synced(self, manifest: Manifest, record: VersionRecord) -> bool:
        """Add a discovered version unless a register call or a delete got there first."""
        if self.catalog.is_deleted(manifest.model_id, manifest.version):
            return False
        if self.catalog.has(manifest.model_id, manifest.version):
            old = self.catalog.models[manifest.model_id].versions[manifest.version]
            if old.source != record.source or old.manifest_digest == record.manifest_digest:
                return False
            record = record.model_copy(update={"pinned": old.pinned, "registered": old.registered})
        self.catalog.put(manifest.model_id, record)
        log_event(logger, "model_discovered", model=manifest.model_id, version=manifest.version)
        return True

    def status(self) -> dict:
        models = self.catalog.models
        return {
            "models": len(models),
            "versions": sum(len(m.versions) for m in models.values()),
            "profiles_missing": sum(1 for m in models.values() for v in m.versions.values() if v.profile is None),
            **self.warm.counts(),
            "usage_models": len(self.usage.models),
            "usage_events_pending": len(self.usage.pending),
            "last_sync": self.last_sync,
            "store": ", ".join(t.describe() for t in self.store.tiers) if self.store else None,
            "prefetch": self.prefetch.status(),
        }

