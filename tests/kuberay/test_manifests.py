"""kuberay/ manifests: valid against KubeRay's CRDs and Kubernetes's schemas, and in step with serve_configs/.

Pure and fast: no Ray, no vLLM, no API server (the schemas are checked offline)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from helios.cli import app
from helios.config import parse_args
from helios.ray_env import ray_cluster_env
from helios.scaling import kuberay
from helios.scaling.kuberay_schemas import check_documents, check_file

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "kuberay").glob("*.yaml"))
RAYSERVICES = [p for p in MANIFESTS if any(d.get("kind") == "RayService" for d in kuberay.documents(p.read_text()))]


def _docs(name: str) -> list[dict[str, Any]]:
    return kuberay.documents((ROOT / "kuberay" / name).read_text())


def _messages(docs: list[dict[str, Any]]) -> list[str]:
    return [str(p) for p in check_documents(docs)]


def _ray_containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def test_both_rayservices_are_committed() -> None:
    assert {p.name for p in RAYSERVICES} == {"rayservice-cpu-demo.yaml", "rayservice-production.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_committed_manifest_validates(path: Path) -> None:
    assert [str(p) for p in check_file(path)] == []


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rendering_the_config_reproduces_the_committed_manifest(path: Path) -> None:
    name = kuberay.config_path(path.read_text())
    assert name and (ROOT / name).is_file()
    assert kuberay.render(ROOT / name, path) == path.read_text()
    assert kuberay.drift(path, ROOT) is None


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_the_embedded_serve_config_passes_helios_validation(path: Path) -> None:
    embedded = kuberay.embedded_config(path.read_text())
    assert embedded == yaml.safe_load((ROOT / kuberay.config_path(path.read_text())).read_text())
    assert kuberay.helios_config_errors(embedded) == []
    assert kuberay.serve_config_problems(path, ROOT) == []


def test_a_config_edit_not_rendered_is_drift(tmp_path: Path) -> None:
    (tmp_path / "kuberay").mkdir()
    (tmp_path / "serve_configs").mkdir()
    config = tmp_path / "serve_configs" / "local.yaml"
    config.write_text((ROOT / "serve_configs" / "local.yaml").read_text().replace("max_model_len: 2048", "max_model_len: 4096"))
    manifest = tmp_path / "kuberay" / "demo.yaml"
    manifest.write_text((ROOT / "kuberay" / "rayservice-cpu-demo.yaml").read_text())
    assert "differs from serve_configs/local.yaml" in kuberay.drift(manifest, tmp_path)
    assert kuberay.manifests_embedding(config, tmp_path) == [manifest]
    manifest.write_text(kuberay.render(config, manifest))
    assert kuberay.drift(manifest, tmp_path) is None
    assert kuberay.embedded_config(manifest.read_text())["applications"][0]["args"]["models"][0]["engine"][
        "max_model_len"] == 4096


def test_render_keeps_the_manifest_around_the_block() -> None:
    manifest = "# head\nkind: RayService\nspec:\n  serveConfigV2: |\n    old: 1\n\n  # after\n  other: 2\n"
    out = kuberay.embed(manifest, "# cfg\napplications:\n  - name: a\n\n    x: 1\n")
    assert out == ("# head\nkind: RayService\nspec:\n  serveConfigV2: |\n    # cfg\n    applications:\n"
                   "      - name: a\n\n        x: 1\n\n  # after\n  other: 2\n")
    assert yaml.safe_load(out)["spec"]["other"] == 2


def test_render_refuses_a_manifest_without_exactly_one_block() -> None:
    with pytest.raises(kuberay.ManifestError, match="exactly one"):
        kuberay.embed("spec: {}\n", "applications: []\n")


def test_a_wrong_type_and_an_unknown_field_fail_naming_their_paths() -> None:
    docs = _docs("rayservice-production.yaml")
    cluster = docs[0]["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["replicas"] = "one"
    cluster["workerGroupSpecs"][0]["rayStartParam"] = {}
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [4]
    cluster["enableInTreeAutoscaling"] = "yes"
    messages = _messages(docs)
    where = "RayService/helios: spec.rayClusterConfig"
    assert f"{where}.workerGroupSpecs[0].replicas: 'one' is not of type 'integer'" in messages
    assert any(m.startswith(f"{where}.workerGroupSpecs[0]: ") and "'rayStartParam' was unexpected" in m
               for m in messages)
    assert any(m.startswith(f"{where}.headGroupSpec.template.spec.containers[0].resources.limits.cpu: ")
               for m in messages)
    assert f"{where}.enableInTreeAutoscaling: 'yes' is not of type 'boolean'" in messages


def test_a_cel_rule_and_kuberays_replica_bounds_are_checked() -> None:
    docs = _docs("rayservice-production.yaml")
    docs[0]["spec"]["rayClusterConfig"]["managedBy"] = "someone-else"
    docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 9
    messages = _messages(docs)
    assert any(m.startswith("RayService/helios: spec.rayClusterConfig.managedBy: the managedBy field value must be")
               for m in messages)
    assert any(".workerGroupSpecs[0].minReplicas: 9 is above maxReplicas 8" in m for m in messages)
    assert any(".workerGroupSpecs[0].replicas: 1 is outside minReplicas..maxReplicas" in m for m in messages)


def test_an_out_of_range_int32_fails() -> None:
    docs = _docs("rayservice-production.yaml")
    docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40
    assert any(".workerGroupSpecs[0].maxReplicas: " in m and "int32" in m for m in _messages(docs))


def test_broken_core_objects_fail_against_kubernetes_schemas() -> None:
    docs = _docs("rayservice-production.yaml")
    service = next(d for d in docs if d["kind"] == "Service")
    service["spec"]["ports"][0]["port"] = "eighty"
    service["spec"]["clusterIp"] = "None"
    messages = _messages([docs[0], service])
    assert len(messages) == 1 and messages[0].startswith("Service/helios-api: spec")  # it reports the first
    secret = copy.deepcopy(_docs("secrets.example.yaml")[0])
    secret["stringdata"] = secret.pop("stringData")
    assert any(m.startswith("Secret/helios-s3: ") and "stringdata" in m for m in _messages([secret]))


def test_a_bad_name_fails() -> None:
    docs = _docs("rayservice-cpu-demo.yaml")
    docs[0]["metadata"]["name"] = "Helios_Demo"
    [message] = _messages(docs)
    assert message.startswith("RayService/Helios_Demo: metadata.name: 'Helios_Demo' is not a DNS-1123 subdomain")


def test_pod_monitor_and_service_must_reach_the_ray_pods() -> None:
    docs = _docs("rayservice-production.yaml")
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "prometheus"
    service = next(d for d in docs if d["kind"] == "Service")
    service["spec"]["selector"]["helios/app"] = "other"
    assert _messages(docs) == [
        "Service/helios-api: spec.selector: matches no pod template in this file",
        "PodMonitor/helios: spec.podMetricsEndpoints[0].port: 'prometheus' is not a named port of every pod it selects",
    ]


def test_production_layout() -> None:
    """The production example keeps its promises: no replicas on the head, GPU and MIG groups,
    the tiers on their volumes, S3 credentials from a Secret, autoscaler v2, Helios's probes."""
    docs = _docs("rayservice-production.yaml")
    assert [d["kind"] for d in docs] == ["RayService", "Service", "PodMonitor"]
    cluster = docs[0]["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    gpu, mig = cluster["workerGroupSpecs"]
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in (gpu, mig)]
    assert limits[0]["nvidia.com/gpu"] == "1" and limits[1]["nvidia.com/mig-1g.10gb"] == "1"
    args = parse_args(kuberay.embedded_config(yaml.safe_dump(docs[0]))["applications"][0]["args"])
    tiers = {t.kind: t for t in args.storage.tiers}
    assert tiers["remote"].url.startswith("s3://")
    for group in (gpu, mig):
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        ram = volumes[mounts[tiers["ram"].path]]["emptyDir"]
        assert ram["medium"] == "Memory"
        assert _bytes(ram["sizeLimit"]) >= int(tiers["ram"].capacity)
        assert "hostPath" in volumes[mounts[str(args.resolved_cache_root())]]
        assert tiers["nvme"].path.startswith(str(args.resolved_cache_root()) + "/")
        container = pod["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
        assert "http://127.0.0.1:8000/healthz" in container["livenessProbe"]["exec"]["command"][-1]
    env = {e["name"]: e for e in _ray_containers(docs[0])[0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "helios-s3", "key": "AWS_SECRET_ACCESS_KEY"}


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_ray_pods_start_with_the_environment_helios_serve_sets(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {})
    wanted = ray_cluster_env()
    service = next(d for d in kuberay.documents(path.read_text()) if d["kind"] == "RayService")
    for container in _ray_containers(service):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in wanted} == wanted, container["name"]


def test_cli_render_writes_in_place_and_check_reports_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kuberay").mkdir()
    (tmp_path / "serve_configs").mkdir()
    (tmp_path / "serve_configs" / "local.yaml").write_text((ROOT / "serve_configs" / "local.yaml").read_text())
    manifest = tmp_path / "kuberay" / "demo.yaml"
    manifest.write_text(kuberay.embed((ROOT / "kuberay" / "rayservice-cpu-demo.yaml").read_text(), "applications: []\n"))
    runner = CliRunner()
    result = runner.invoke(app, ["kuberay", "check", str(manifest)])
    assert result.exit_code == 1 and "no `applications:` list" in result.output
    result = runner.invoke(app, ["kuberay", "render", "serve_configs/local.yaml"])
    assert result.exit_code == 0, result.output
    assert manifest.read_text() == (ROOT / "kuberay" / "rayservice-cpu-demo.yaml").read_text()
    result = runner.invoke(app, ["kuberay", "check", str(manifest)])
    assert result.exit_code == 0 and "ok" in result.output
