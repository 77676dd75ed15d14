"""Check KubeRay manifests offline against the schemas a real API server would use.

- RayService / RayCluster: the `openAPIV3Schema` of KubeRay's own CRDs (vendored in
  kuberay/crds/), strict like `kubectl apply --validate=strict` (an unknown field is an
  error), with `format` checks (int32, int64) and the CRDs' CEL rules (`x-kubernetes-validations`,
  through cel-python; update-only rules that read `oldSelf` cannot apply to a new object).
- Core objects (Service, Secret, ...): Kubernetes's own schemas, strict, from `kubernetes-validate`.
- PodMonitor (Prometheus operator): no schema here; its selector must match a pod template in
  the same file and each endpoint's port must be a named port of that pod, which is what
  breaks silently when a manifest is edited.

Not checked (an API server and the KubeRay operator would): defaulting and pruning, ObjectMeta
beyond the name's syntax, and most of the operator's Go-side checks (two are re-done here:
worker group names are unique, and minReplicas <= replicas <= maxReplicas).

Needs the `kuberay` extra: openapi-schema-validator, cel-python, kubernetes-validate.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import yaml
from openapi_schema_validator import OAS30Validator, oas30_format_checker

CRD_DIR = Path(__file__).resolve().parents[2] / "kuberay" / "crds"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one document: `where` is `Kind/name`, `path` the field (`spec.x[0].y`)."""

    where: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path}: {self.message}"


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "$"


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever the API server would prune."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@functools.lru_cache(maxsize=4)
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every CRD version in `crd_dir`."""
    out = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=_LOADER):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: see _name_problems
                out[(f"{group}/{version['name']}", kind)] = schema
    if not out:
        raise FileNotFoundError(f"no CRDs in {crd_dir}")
    return out


@functools.lru_cache(maxsize=64)
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_problems(schema: dict[str, Any], value: Any, path: list[Any]) -> Iterator[tuple[str, str]]:
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"] and not _cel_program(rule["rule"]).evaluate(
                {"self": celpy.json_to_cel(value)}):
            yield _path(path), rule.get("message", rule["rule"])
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            if sub_schema:
                yield from _cel_problems(sub_schema, sub, [*path, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _cel_problems(schema["items"], item, [*path, i])


def _crd_problems(schema: dict[str, Any], doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    validator = OAS30Validator(schema, format_checker=oas30_format_checker)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        yield _path(error.absolute_path), error.message
    yield from _cel_problems(schema, doc, [])


def _worker_group_problems(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    spec = doc.get("spec") or {}
    cluster, at = (spec.get("rayClusterConfig"), "spec.rayClusterConfig") if doc["kind"] == "RayService" \
        else (spec, "spec")
    groups = (cluster or {}).get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        where = f"{at}.workerGroupSpecs[{i}]"
        if names.count(group.get("groupName")) > 1:
            yield f"{where}.groupName", f"{group.get('groupName')!r} is used by more than one worker group"
        low, high, want = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if all(isinstance(n, int) for n in (low, high)) and low > high:
            yield f"{where}.minReplicas", f"{low} is above maxReplicas {high}"
        if isinstance(want, int) and all(isinstance(n, int) for n in (low, high)) and not low <= want <= high:
            yield f"{where}.replicas", f"{want} is outside minReplicas..maxReplicas ({low}..{high})"


def _core_problems(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:  # it stops at the first error
        yield _path(error.path), error.message
    except kubernetes_validate.SchemaNotFoundError as error:
        yield "apiVersion", error.message


def _name_problems(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        yield "metadata.name", f"{name!r} is not a DNS-1123 subdomain (lower-case alphanumerics, '-', '.')"


def _template_labels(doc: dict[str, Any]) -> list[tuple[dict[str, str], set[str]]]:
    """(labels, named container ports) of every pod template in a RayService or RayCluster."""
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterConfig", spec) if doc.get("kind") == "RayService" else spec
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    out = []
    for group in groups:
        template = group.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        ports = {p.get("name") for c in (template.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if p.get("name")}
        out.append((labels, ports))
    return out


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    # KubeRay adds the ray.io/* labels itself (ray.io/serve among them): they are not in the template.
    wanted = {k: v for k, v in (selector.get("matchLabels") or selector).items() if not k.startswith("ray.io/")}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _pod_monitor_problems(doc: dict[str, Any], pods: list[tuple[dict[str, str], set[str]]]) -> Iterator[tuple[str, str]]:
    spec = doc.get("spec") or {}
    matched = [ports for labels, ports in pods if _selects(spec.get("selector") or {}, labels)]
    if not matched:
        yield "spec.selector", "matches no pod template in this file"
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        yield "spec.podMetricsEndpoints", "needs at least one endpoint"
        return
    for i, endpoint in enumerate(endpoints):
        port = endpoint.get("port") if isinstance(endpoint, dict) else None
        if matched and not all(port in ports for ports in matched):
            yield f"spec.podMetricsEndpoints[{i}].port", f"{port!r} is not a named port of every pod it selects"


def _service_problems(doc: dict[str, Any], pods: list[tuple[dict[str, str], set[str]]]) -> Iterator[tuple[str, str]]:
    selector = (doc.get("spec") or {}).get("selector")
    if selector and pods and not any(_selects(selector, labels) for labels, _ in pods):
        yield "spec.selector", "matches no pod template in this file"


def check_documents(docs: list[dict[str, Any]], crd_dir: Path = CRD_DIR) -> list[Problem]:
    """Every problem with the documents of one manifest file (empty: all valid)."""
    schemas = crd_schemas(crd_dir)
    pods = [p for doc in docs if (doc.get("apiVersion"), doc.get("kind")) in schemas for p in _template_labels(doc)]
    problems = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        where = f"{key[1]}/{(doc.get('metadata') or {}).get('name')}"
        found = list(_name_problems(doc))
        if key in schemas:
            found += [*_crd_problems(schemas[key], doc), *_worker_group_problems(doc)]
        elif key == ("monitoring.coreos.com/v1", "PodMonitor"):
            found += list(_pod_monitor_problems(doc, pods))
        else:
            found += list(_core_problems(doc))
            if key == ("v1", "Service"):
                found += list(_service_problems(doc, pods))
        problems += [Problem(where, path, message) for path, message in found]
    return problems


def check_file(path: Path, crd_dir: Path = CRD_DIR) -> list[Problem]:
    """Every problem with a (multi-document) manifest file."""
    return check_documents([doc for doc in yaml.safe_load_all(path.read_text()) if doc], crd_dir)
