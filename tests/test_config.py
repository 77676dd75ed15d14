"""Config validation: a bad config fails at start and names the bad key."""

from pathlib import Path

import pytest
import yaml

from helios.config import ConfigError, HeliosArgs, parse_args

ROOT = Path(__file__).resolve().parents[1]


def _model(**kw):
    return {"id": "m", "source": "demo://tiny", **kw}


def test_local_yaml_is_valid_and_serves_the_tiny_demo_model() -> None:
    app = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())["applications"][0]
    assert app["import_path"] == "helios.app:build_app"
    args = parse_args(app["args"])
    assert [m.source for m in args.models] == ["demo://tiny", "demo://tiny"]
    assert [m.engine.runner for m in args.models] == ["auto", "pooling"]  # a generator and an embedder
    assert args.models[0].engine.tool_call_parser == "hermes"
    assert all(m.deployment.accelerator == "cpu" for m in args.models)


@pytest.mark.parametrize(
    "args, key",
    [
        ({"models": [_model(engine={"max_model_lenn": 10})]}, "models.0.engine.max_model_lenn"),
        ({"models": [_model(engine={"dtype": "int3"})]}, "models.0.engine.dtype"),
        ({"models": [_model(deployment={"num_replicas": 0})]}, "models.0.deployment.num_replicas"),
        ({"models": [_model()], "routr": {}}, "routr"),
        ({"models": [_model()], "router": {"api_key": "x"}}, "router.api_key"),
        ({"models": [{"source": "demo://tiny"}]}, "models.0.id"),
        ({"models": [_model(source="demo://huge")]}, "models.0.source"),
        ({"models": [_model(source="s3://bucket/model")]}, "models.0.source"),
        ({"models": []}, "models"),
        ({}, "models"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "rma", "capacity": "1GiB"}]}}, "storage.tiers.0"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "ram", "capacity": "lots"}]}},
         "storage.tiers.0.ram.capacity"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "remote", "url": "bucket/x"}]}},
         "storage.tiers.0.remote.url"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "ram", "capacity": "1GiB", "size": 1}]}},
         "storage.tiers.0.ram.size"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "ram", "capacity": "1GiB"}],
                                           "transfer": {"chunk_mib": 0}}}, "storage.transfer.chunk_mib"),
    ],
)
def test_bad_config_names_the_bad_key(args: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert f"  {key}:" in str(info.value)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"models": [_model()], "storage": {"tiers": [{"kind": "ram", "capacity": "1GiB"}] * 2}},
         "more than one tier of kind ['ram']"),
        ({"models": [_model()], "storage": {"tiers": [{"kind": "remote", "url": "s3://b/p"}]}},
         "at least one local tier"),
        ({"models": [_model(source="store://org/m:v1")]}, "models.0.source: store:// needs a `storage:` section"),
        ({"models": [_model(engine={"share_weights": True})]}, "share_weights: needs a `storage:` section"),
    ],
)
def test_storage_rules_are_explained(args: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert message in str(info.value)


def test_storage_capacities_take_units() -> None:
    args = parse_args({"models": [_model(source="store://org/m:v1")], "storage": {"tiers": [
        {"kind": "ram", "capacity": "4GiB"}, {"kind": "nvme", "capacity": "500MB", "path": "/x"},
        {"kind": "remote", "url": "s3://b/p", "storage_options": {"endpoint_url": "http://h:1"}}]}})
    ram, nvme, remote = args.storage.tiers
    assert (ram.capacity, nvme.capacity, remote.url) == (4 << 30, 500 * 10**6, "s3://b/p")


def test_duplicate_model_ids_are_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate id"):
        parse_args({"models": [_model(), _model()]})


def test_api_keys_come_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELIOS_API_KEYS", "env-key-1, env-key-2")
    args = parse_args({"models": [_model()], "router": {"api_keys": ["cfg-key"]}})
    assert args.router.keys() == ["cfg-key", "env-key-1", "env-key-2"]
    assert "cfg-key" not in repr(args.router)  # secrets stay out of logs


def test_cache_root_defaults_to_env_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HELIOS_CACHE_ROOT", str(tmp_path))
    assert HeliosArgs(models=[_model()]).resolved_cache_root() == tmp_path
    monkeypatch.delenv("HELIOS_CACHE_ROOT")
    assert HeliosArgs(models=[_model()]).resolved_cache_root() == Path("~/.cache/helios").expanduser()


def test_unknown_engine_extra_arg_is_rejected(tmp_path: Path) -> None:
    from helios.engine.llm_engine import engine_kwargs
    from helios.errors import InvalidRequest

    args = parse_args({"models": [_model(engine={"extra_args": {"block_size": 16}})]})
    assert engine_kwargs(args.models[0], tmp_path)["block_size"] == 16
    bad = parse_args({"models": [_model(engine={"extra_args": {"blok_size": 16}})]})
    with pytest.raises(InvalidRequest, match="blok_size"):
        engine_kwargs(bad.models[0], tmp_path)


def test_min_replicas_makes_a_model_autoscale_down_to_zero() -> None:
    from helios.engine.deployment import autoscaling_config

    model = {"id": "m", "source": "demo://tiny"}
    fixed = autoscaling_config(parse_args({"models": [model]}).models[0])
    assert (fixed["min_replicas"], fixed["policy"]["policy_kwargs"]["min_replicas"],
            fixed["policy"]["policy_kwargs"]["max_replicas"]) == (1, 1, 1)  # a config's count is what runs
    assert "downscale_to_zero_delay_s" not in fixed
    scaled = autoscaling_config(parse_args({"models": [{**model, "deployment": {
        "num_replicas": 1, "min_replicas": 0, "max_replicas": 3, "idle_to_zero_s": 60}}]}).models[0])
    assert scaled["min_replicas"] == 0 and scaled["downscale_to_zero_delay_s"] == 60
    assert scaled["policy"]["policy_kwargs"] | {"model_id": "m"} == {
        "model_id": "m", "min_replicas": 0, "max_replicas": 3, "predictive": True}
    with pytest.raises(ConfigError, match="min_replicas"):
        parse_args({"models": [{**model, "deployment": {"num_replicas": 1, "min_replicas": 2}}]})


@pytest.mark.parametrize(
    "args, message",
    [
        ({"models": [_model(), _model(id="n")]}, "router.colocate_engine: needs exactly one model"),
        ({"models": [_model(serving="disaggregated")]}, "models.0.serving must be unified"),
        ({"models": [_model(deployment={"min_replicas": 0, "num_replicas": 1})]},
         "models.0.deployment.min_replicas"),
        ({"models": [_model(deployment={"num_replicas": 2})], "router_extra": {"num_replicas": 3}},
         "router.num_replicas"),
    ],
)
def test_a_colocated_engine_needs_one_fixed_size_unified_model(args: dict, message: str) -> None:
    router = {"colocate_engine": True, **args.pop("router_extra", {})}
    with pytest.raises(ConfigError, match=message):
        parse_args({**args, "router": router})


def test_a_colocated_engine_runs_the_models_replica_count_with_its_resources() -> None:
    """Each of the model's replicas is a router too: the router config it gets counts them all, so
    models reached by handle share their capacity among them (admission divides by it)."""
    from helios.config import RouterContext
    from helios.router.ingress import colocated_router_deployment

    args = parse_args({"models": [_model(deployment={"num_replicas": 2, "num_cpus": 3})],
                       "router": {"colocate_engine": True}})
    bound = colocated_router_deployment(args.router, args.models[0], RouterContext(cache_root="/unused"))
    deployment = bound._bound_deployment
    router, model = deployment.init_args[0], deployment.init_args[4]
    assert deployment.num_replicas == 2 and router["num_replicas"] == 2
    assert deployment.ray_actor_options["num_cpus"] == 3.0 and model["id"] == "m"
