"""The catalog: every model id, its versions, the default version, and how it may be deployed and scaled.

The catalog is small and changed rarely (a deploy, an admin call, a push found in the
store), so it is one JSON file rewritten atomically after every change: a registry killed
at any moment restarts with the catalog of its last completed call.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from helios.config import MODEL_ID_PATTERN
from helios.errors import InvalidRequest, ModelNotFound, ModelVersionNotFound
from helios.observability.logs import get_logger, log_event
from helios.registry.profile import ResourceProfile
from helios.storage.tiers import atomic_write_bytes

logger = get_logger("registry.catalog")

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # as a manifest's version


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScaleSettings(_Record):
    """The replica range a model's deployment may scale within (min_replicas > 0 keeps a warm pool)."""

    min_replicas: int = Field(0, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas autoscaling may start.")
    explicit: bool = Field(
        False, description="Set by an admin or at registration; a default one leaves a config model's own "
        "replica counts in force.")

    @model_validator(mode="after")
    def _ordered(self) -> ScaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class VersionRecord(_Record):
    """One version of a model: where its files are and what it needs."""

    version: str
    source: str = Field(..., description="A directory, file://, demo://<preset> or store://ID:VERSION.")
    manifest_digest: str | None = Field(None, description="sha256 of the version's manifest, when it has one.")
    created: float = Field(..., description="When the version was made (its manifest's time, else registration).")
    registered: float = Field(default_factory=time.time)
    pinned: bool = Field(False, description="Declared in the Serve config, not only registered at run time.")
    profile: ResourceProfile | None = None
    profile_error: str | None = Field(None, description="Why the profile is missing (retried later).")


class ModelRecord(_Record):
    """One model id: its versions and the one requests without a version get."""

    id: str
    default_version: str | None = None
    versions: dict[str, VersionRecord] = Field(default_factory=dict)
    deploy: dict[str, Any] = Field(default_factory=dict, description="Engine and deployment settings, as given.")
    scale: ScaleSettings = Field(default_factory=ScaleSettings)

    @property
    def pinned(self) -> bool:
        return any(v.pinned for v in self.versions.values())

    def newest(self) -> list[VersionRecord]:
        return sorted(self.versions.values(), key=lambda v: (v.created, v.registered, v.version), reverse=True)


class CatalogState(_Record):
    format: int = 1
    models: dict[str, ModelRecord] = Field(default_factory=dict)
    deleted: list[str] = Field(default_factory=list, description="ID:VERSION refs a store sync must not re-add.")


def check_ids(model_id: str, version: str | None = None) -> None:
    if not re.match(MODEL_ID_PATTERN, model_id):
        raise InvalidRequest(f"model id {model_id!r} does not match {MODEL_ID_PATTERN}", param="model")
    if version is not None and not re.match(VERSION_PATTERN, version):
        raise InvalidRequest(f"version {version!r} does not match {VERSION_PATTERN}", param="version")


def scale_settings(min_replicas: int, max_replicas: int) -> ScaleSettings:
    try:
        return ScaleSettings(min_replicas=min_replicas, max_replicas=max_replicas, explicit=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "scale." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "scale"
        raise InvalidRequest(f"{key}: {err['msg']}", param=key) from None


class Catalog:
    """The catalog in memory, with the rules for defaults and deletion; `save`/`load` keep it on disk."""

    def __init__(self, state: CatalogState | None = None) -> None:
        self.state = state or CatalogState()

    @property
    def models(self) -> dict[str, ModelRecord]:
        return self.state.models

    # --- lookups ---
    def model(self, model_id: str) -> ModelRecord:
        record = self.models.get(model_id)
        if record is None:
            raise ModelNotFound(f"model {model_id!r} is not registered", param="model")
        return record

    def get(self, model_id: str, version: str | None = None) -> VersionRecord:
        """A version, or the model's default; ModelNotFound / ModelVersionNotFound otherwise."""
        record = self.model(model_id)
        name = version or record.default_version
        if name is None or name not in record.versions:
            have = ", ".join(v.version for v in record.newest()) or "none"
            raise ModelVersionNotFound(f"model {model_id!r} has no version {name!r} (have: {have})", param="model")
        return record.versions[name]

    def has(self, model_id: str, version: str) -> bool:
        return version in self.models.get(model_id, ModelRecord(id=model_id)).versions

    def is_deleted(self, model_id: str, version: str) -> bool:
        return f"{model_id}:{version}" in self.state.deleted

    # --- changes ---
    def put(
        self,
        model_id: str,
        record: VersionRecord,
        make_default: bool = False,
        deploy: dict[str, Any] | None = None,
        scale: ScaleSettings | None = None,
    ) -> VersionRecord:
        """Add or replace a version; a model's first version becomes its default."""
        check_ids(model_id, record.version)
        model = self.models.setdefault(model_id, ModelRecord(id=model_id))
        old = model.versions.get(record.version)
        if old is not None and old.pinned and not record.pinned:
            record = record.model_copy(update={"pinned": True})  # a run-time re-register keeps the config's pin
        model.versions[record.version] = record
        if make_default or model.default_version not in model.versions:
            model.default_version = record.version
        if deploy is not None:
            model.deploy = dict(deploy)
        if scale is not None:
            model.scale = scale
        ref = f"{model_id}:{record.version}"
        if ref in self.state.deleted:
            self.state.deleted.remove(ref)
        return record

    def delete(self, model_id: str, version: str | None = None) -> list[str]:
        """Drop a model or one version (remembered so a store sync does not bring it back); returns the refs."""
        model = self.model(model_id)
        if version is None:
            gone = list(model.versions)
            del self.models[model_id]
        else:
            self.get(model_id, version)
            gone = [version]
            del model.versions[version]
            if not model.versions:
                del self.models[model_id]
            elif model.default_version == version:
                model.default_version = model.newest()[0].version
        refs = [f"{model_id}:{v}" for v in gone]
        self.state.deleted = sorted(set(self.state.deleted) | set(refs))
        return refs

    def set_default(self, model_id: str, version: str) -> VersionRecord:
        record = self.get(model_id, version)
        self.model(model_id).default_version = version
        return record

    def set_scale(self, model_id: str, scale: ScaleSettings) -> ScaleSettings:
        self.model(model_id).scale = scale
        return scale

    # --- disk ---
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.state.model_dump_json(indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """The saved catalog; a file that cannot be read is set aside (logged), never silently overwritten."""
        if not path.exists():
            return cls()
        try:
            return cls(CatalogState.model_validate_json(path.read_bytes()))
        except (ValidationError, ValueError, OSError) as exc:
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.rename(aside)
            log_event(logger, "catalog_unreadable", path=str(path), moved_to=str(aside), error=str(exc)[:500])
            return cls()
