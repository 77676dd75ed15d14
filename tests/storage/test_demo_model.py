"""The demo model: byte-identical on every machine, a working byte-level tokenizer and chat template."""

import json
import os
from pathlib import Path

import pytest

from helios.storage import demo_model
from helios.storage.demo_model import PRESETS, build, file_digests

# The tiny preset's files, byte for byte. A change here changes every machine's model:
# only update these with a deliberate change to the demo model.
TINY_SHA256 = {
    "config.json": "e1c725d76ae5307053f33014256fa9356757b44e7ac46bb1569a7ad0480cc934",
    "generation_config.json": "187b84bb6f2e6eb2984b15f84914f3476c62e7461dfaeaa93b619a1e8e78c9b2",
    "model.safetensors": "b2ab7eb4add0faa7999a2c55fab8e25154bce1edc1daecaedc7b135db9181ce5",
    "tokenizer.json": "6230d0b5a7cdcc2ed668eef745620f19293738fffaeb3ecb6cf3f650b6f22e72",
    "tokenizer_config.json": "9e01fb7f25d5eb76e4a6f3810dc3823d2c22563d5d4642a01058846e79b3b0f7"  # chat template renders tools (Hermes style),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("tiny", tmp_path_factory.mktemp("demo") / "tiny")


def test_tiny_preset_is_byte_identical_everywhere(tiny: Path) -> None:
    assert dict(file_digests(tiny)) == TINY_SHA256


def test_building_twice_gives_the_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = build("tiny", tmp_path / "again")
    assert dict(file_digests(again)) == dict(file_digests(tiny))


def test_existing_model_is_kept_and_no_temp_dirs_are_left(tiny: Path) -> None:
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build("tiny", tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before
    assert [p.name for p in tiny.parent.iterdir()] == [tiny.name]


def test_built_files_are_readable_by_other_users(tiny: Path) -> None:
    assert os.stat(tiny).st_mode & 0o005 == 0o005
    assert all(p.stat().st_mode & 0o004 for p in tiny.iterdir())


def test_tiny_weights_match_the_preset_shapes(tiny: Path) -> None:
    from safetensors import safe_open

    preset = PRESETS["tiny"]
    with safe_open(str(tiny / "model.safetensors"), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - a safetensors file, not a dict
    assert shapes == preset.param_shapes()
    assert (tiny / "model.safetensors").stat().st_size == pytest.approx(preset.weight_bytes(), rel=0.01)
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"


def test_bench_preset_is_1_to_2_gb_in_shards() -> None:
    preset = PRESETS["bench"]
    assert 1e9 <= preset.weight_bytes() <= 2e9
    assert len(demo_model._shards(preset)) >= 2


def test_tokenizer_is_byte_level_and_round_trips(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    text = "Hello, wörld! 你好 🙂"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == demo_model.VOCAB_SIZE


def test_chat_template_renders_roles_and_generation_prompt(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|begin_of_text|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == demo_model.BOS_ID and ids[-2] == tok.convert_tokens_to_ids("<|assistant|>")


def test_chat_template_renders_tools_calls_and_results(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
    ]
    rendered = tok.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|system|>\nYou may call these tools:\n<tools>\n")
    assert '"name": "get_weather"' in rendered
    assert '<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|end|>' in rendered
    assert rendered.endswith("<|tool|>\n-3C<|end|>\n<|assistant|>\n")


def test_config_knows_every_preset() -> None:
    from helios.config import DEMO_PRESETS

    assert set(DEMO_PRESETS) == set(PRESETS)


def test_weights_come_from_integer_hashing_not_a_library_rng() -> None:
    a = demo_model._uniform("w", (4, 8), 1.0)
    assert a.dtype.name == "float32" and (abs(a) <= 1.0).all()
    assert (a == demo_model._uniform("w", (4, 8), 1.0)).all()
    assert not (a == demo_model._uniform("v", (4, 8), 1.0)).all()


def test_resolve_source_builds_demo_into_cache(tmp_path: Path) -> None:
    path = demo_model.resolve_source("demo://tiny", tmp_path)
    assert path == tmp_path / "demo" / "tiny" and (path / "config.json").exists()
    assert demo_model.resolve_source("file:///models/x", tmp_path) == Path("/models/x")
