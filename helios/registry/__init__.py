"""The registry: one actor per cluster holding the catalog, resource profiles, usage and the warm view."""

from helios.registry.actor import (
    REGISTRY_NAME,
    REGISTRY_NAMESPACE,
    Registry,
    default_state_dir,
    get_or_create_registry,
    get_registry,
)
from helios.registry.profile import ResourceProfile, profile_from_dir, profile_from_store

__all__ = [
    "REGISTRY_NAME",
    "REGISTRY_NAMESPACE",
    "Registry",
    "ResourceProfile",
    "default_state_dir",
    "get_or_create_registry",
    "get_registry",
    "profile_from_dir",
    "profile_from_store",
]
