"""Replica resources and placement groups from a model's parallelism, and the vLLM arguments that follow
(pure: no Ray, no GPU; where Ray puts them on a multi-node cluster: tests/test_placement_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helios.config import ConfigError, parse_args
from helios.engine.deployment import engine_deployment
from helios.engine.llm_engine import engine_kwargs
from helios.engine.placement import GiB, placement_for, warm_first


def model(deployment: dict | None = None, **engine: object):
    return parse_args({"models": [{"id": "m", "source": "demo://tiny", "engine": engine,
                                   "deployment": deployment or {}}]}).models[0]


def test_cpu_replicas_reserve_logical_cpus_only() -> None:
    p = placement_for(model({"num_cpus": 2}))
    assert p.deployment_options() == {"ray_actor_options": {"num_cpus": 2}}


def test_tensor_parallel_is_one_gang_inside_a_node() -> None:
    m = model({"accelerator": "gpu", "num_cpus": 1}, tensor_parallel_size=2)
    p = placement_for(m)
    assert p.bundles == [{"CPU": 1}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert p.strategy == "STRICT_PACK"
    assert p.actor_options == {"num_cpus": 1, "num_gpus": 0}  # the replica sits in the CPU bundle
    kwargs = engine_kwargs(m, Path("/models/m"))
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["tensor_parallel_size"] == 2


def test_pipeline_stages_may_spread_over_nodes() -> None:
    m = model({"accelerator": "gpu"}, tensor_parallel_size=2, pipeline_parallel_size=2)
    p = placement_for(m)
    assert len(p.bundles) == 5 and p.strategy == "PACK"
    assert engine_kwargs(m, Path("/models/m"))["pipeline_parallel_size"] == 2


def test_a_gpu_fraction_shares_a_gpu_and_scales_vllms_memory_share() -> None:
    m = model({"accelerator": "gpu", "gpu_fraction": 0.5}, gpu_memory_utilization=0.9)
    assert placement_for(m).actor_options == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert engine_kwargs(m, Path("/models/m"))["gpu_memory_utilization"] == 0.45


def test_a_mig_slice_is_its_custom_resource_and_the_model_must_fit() -> None:
    m = model({"accelerator": "mig-1g.10gb"})
    assert placement_for(m, memory_need=6 * GiB).actor_options == {"num_cpus": 1.0, "resources": {"mig-1g.10gb": 1}}
    with pytest.raises(ConfigError, match="needs 12.0 GiB, more than the 10 GiB"):
        placement_for(m, memory_need=12 * GiB)


@pytest.mark.parametrize(("deployment", "engine", "message"), [
    ({"accelerator": "cpu"}, {"tensor_parallel_size": 2}, "needs accelerator gpu"),
    ({"accelerator": "mig-1g.10gb"}, {"tensor_parallel_size": 2}, "MIG slice runs one rank"),
    ({"accelerator": "gpu", "gpu_fraction": 0.5}, {"tensor_parallel_size": 2}, "whole GPUs"),
])
def test_impossible_placements_name_the_key(deployment: dict, engine: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        placement_for(model(deployment, **engine))


def test_a_bad_accelerator_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="accelerator"):
        model({"accelerator": "tpu"})


def test_the_engine_deployment_carries_the_placement_group() -> None:
    deployment = engine_deployment(model({"accelerator": "gpu"}, tensor_parallel_size=2), "/tmp/cache")._bound_deployment
    replica = deployment._replica_config  # what Serve will start the replicas with
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.placement_group_bundles == [{"CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert deployment.ray_actor_options["num_gpus"] == 0


def test_warm_nodes_become_label_selectors_warmest_first_then_any_node() -> None:
    placed = warm_first(placement_for(model({"accelerator": "gpu", "gpu_fraction": 0.5})), [["n2"], ["n1", "n3"]])
    options = placed.actor_options
    assert options["num_gpus"] == 0.5 and options["label_selector"] == {"ray.io/node-id": "in(n2)"}
    assert options["fallback_strategy"] == [{"label_selector": {"ray.io/node-id": "in(n1,n3)"}},
                                            {"label_selector": {"ray.io/node-id": "!in(n1,n2,n3)"}}]
    assert warm_first(placement_for(model()), []).actor_options == {"num_cpus": 1.0}  # nothing warm: no preference


def test_a_placement_group_replica_keeps_rays_choice_of_node() -> None:
    gang = placement_for(model({"accelerator": "gpu"}, tensor_parallel_size=2))
    assert warm_first(gang, [["n1"]]) == gang  # Serve has no fallback for bundle selectors: it would be hard


def test_the_engine_deployment_takes_the_registrys_hints() -> None:
    m = model({"accelerator": "mig-1g.10gb"})
    bound = engine_deployment(m, "/tmp/cache", hints={"warm_nodes": [["n1"]], "memory_need": 2 * GiB})
    options = bound._bound_deployment.ray_actor_options
    assert options["resources"] == {"mig-1g.10gb": 1} and options["label_selector"] == {"ray.io/node-id": "in(n1)"}
    with pytest.raises(ConfigError, match="needs 11.0 GiB"):
        engine_deployment(m, "/tmp/cache", hints={"warm_nodes": [], "memory_need": 11 * GiB})
