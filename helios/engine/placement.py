"""Where a model's engine replicas run: Ray resources and placement groups from its parallelism.

- CPU: the configured logical CPUs.
- One GPU or less (`gpu_fraction`): `num_gpus` below one lets several small models share a
  GPU; vLLM's `gpu_memory_utilization` is scaled to the share so the engines fit together.
- A MIG slice (`accelerator: mig-1g.10gb`): the custom resource the node advertises for it;
  the model's memory need (weights and KV, from its registry profile) must fit the slice.
- Tensor x pipeline parallel (world size above one): a placement group of one CPU bundle for
  the replica and one GPU bundle per rank, placed all or none (gang). `STRICT_PACK` keeps a
  tensor-parallel group inside one node (it talks over NVLink every layer); with pipeline
  stages, `PACK` lets stages spill to other nodes (they exchange activations once per
  stage). vLLM runs its workers in that placement group (`distributed_executor_backend="ray"`).
- Warm first (`warm_first`): a replica prefers the nodes whose tiers already hold the model,
  warmest first, through label selectors on Ray's node-id label with fallbacks down to any
  node, so a scale-up or a start from zero maps local blobs when it can and waits for no node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from helios.config import ConfigError, ModelConfig

MIG = re.compile(r"^mig-(\d+)g\.(\d+)gb$")
GiB = 1 << 30
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it


@dataclass
class Placement:
    actor_options: dict[str, Any]
    bundles: list[dict[str, float]] | None = None
    strategy: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # what vLLM must know of it

    def deployment_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ray_actor_options": self.actor_options}
        if self.bundles:
            out["placement_group_bundles"] = self.bundles
            out["placement_group_strategy"] = self.strategy
        return out


def mig_memory_bytes(accelerator: str) -> int | None:
    """A MIG profile's memory (mig-1g.10gb -> 10 GiB); None for other accelerators."""
    match = MIG.match(accelerator)
    return int(match.group(2)) * GiB if match else None


def placement_for(model: ModelConfig, memory_need: int | None = None) -> Placement:
    """The replica's resources for `model`; `memory_need` (bytes, from its profile) checks a MIG fit."""
    d, e = model.deployment, model.engine
    world = e.tensor_parallel_size * e.pipeline_parallel_size
    where = f"models.{model.id}.deployment"
    if d.accelerator == "cpu":
        if world > 1:
            raise ConfigError(f"{where}.accelerator: tensor/pipeline parallelism needs accelerator gpu")
        return Placement({"num_cpus": d.num_cpus})
    if (slice_bytes := mig_memory_bytes(d.accelerator)) is not None:
        if world > 1:
            raise ConfigError(f"{where}.accelerator: a MIG slice runs one rank; use whole GPUs for parallelism")
        if memory_need is not None and memory_need > slice_bytes:
            raise ConfigError(f"{where}.accelerator: {model.id} needs {memory_need / GiB:.1f} GiB, more than the "
                              f"{slice_bytes // GiB} GiB of a {d.accelerator} slice")
        return Placement({"num_cpus": d.num_cpus, "resources": {d.accelerator: 1}})
    if world == 1:
        fraction = d.gpu_fraction or 1.0
        kwargs = {"gpu_memory_utilization": round(e.gpu_memory_utilization * fraction, 4)} if fraction < 1 else {}
        return Placement({"num_cpus": d.num_cpus, "num_gpus": fraction}, engine_kwargs=kwargs)
    if d.gpu_fraction is not None:
        raise ConfigError(f"{where}.gpu_fraction: a tensor/pipeline-parallel replica takes whole GPUs")
    bundles = [{"CPU": d.num_cpus}] + [{"GPU": 1.0, "CPU": 1.0} for _ in range(world)]
    strategy = "STRICT_PACK" if e.pipeline_parallel_size == 1 else "PACK"
    return Placement({"num_cpus": d.num_cpus, "num_gpus": 0}, bundles, strategy,
                     {"distributed_executor_backend": "ray", "pipeline_parallel_size": e.pipeline_parallel_size})


def warm_first(placement: Placement, warm_nodes: Sequence[Sequence[str]]) -> Placement:
    """`placement` preferring `warm_nodes` (groups, warmest first: `RegistryCore.warm_nodes`).

    The first group is the replica's label selector and each later group a fallback, then every
    other node: soft, so a full or dead warm node never holds a replica back. A replica with a
    placement group keeps Ray's own choice: Serve passes no fallback for bundle selectors, so
    a selector there would be hard and could strand a scale-up."""
    groups = [sorted(set(g)) for g in warm_nodes if g]
    if not groups or placement.bundles:
        return placement
    every = sorted({n for g in groups for n in g})
    selectors = [{NODE_ID_LABEL: f"in({','.join(g)})"} for g in groups]
    selectors.append({NODE_ID_LABEL: f"!in({','.join(every)})"})
    options = {**placement.actor_options, "label_selector": selectors[0],
               "fallback_strategy": [{"label_selector": s} for s in selectors[1:]]}
    return replace(placement, actor_options=options)
