"""The demo model: a Llama-architecture model Helios builds itself, byte-for-byte reproducibly.

No model can be downloaded where Helios is developed and tested, so it ships one. Its
weights come from a counter-based integer hash (splitmix64), not a library RNG, so the
same preset yields the same bytes on every machine and library version; its tokenizer is
byte-level (every UTF-8 byte is a token) with a few special tokens and a chat template.
It exercises every serving path honestly; it just writes nonsense.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|tool|>",
]
BOS_ID = 256
EOS_ID = 257  # <|end_of_text|>
END_TURN_ID = 262  # <|end|>: ends an assistant turn
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Hermes-style tools (vLLM's `hermes` tool-call parser reads `<tool_call>{...}</tool_call>`): the
# tool list in a system turn, an assistant's earlier calls, and tool results as `tool` turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou may call these tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call one as <tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call><|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else "
    "(message['content'] or []) | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "<|{{ message['role'] }}|>\n{{ content }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set args = call['function']['arguments'] %}"
    "<tool_call>{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ args if args is string else args | tojson }}}</tool_call>"
    "{% endfor %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Shape of one demo model; `dtype` is what the safetensors hold."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str  # "float32" | "bfloat16"
    max_shard_bytes: int

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight name with its shape, in Hugging Face Llama naming."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, q),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                }
            )
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (VOCAB_SIZE, h)
        return shapes

    @property
    def bytes_per_param(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def weight_bytes(self) -> int:
        return sum(int(np.prod(s)) for s in self.param_shapes().values()) * self.bytes_per_param


PRESETS: dict[str, Preset] = {
    # About 10 MB: fast enough for every test and for `make serve` on a laptop CPU.
    "tiny": Preset(256, 512, 4, 4, 2, 64, 2048, "float32", 1 << 30),
    # About 1.4 GB in three shards: big enough that loading and transfer dominate.
    "bench": Preset(2048, 5632, 16, 32, 4, 64, 4096, "bfloat16", 512 << 20),
}


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """Counter-based hash: pure uint64 arithmetic, so identical on every machine."""
    z = counter + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform(name: str, shape: tuple[int, ...], bound: float) -> np.ndarray:
    """Values in [-bound, bound) for one tensor, seeded by its name (float32, exact)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        counter = np.arange(n, dtype=np.uint64) + np.uint64(seed)
        bits = _splitmix64(counter) >> np.uint64(40)  # 24 random bits: exact in float32
    unit = bits.astype(np.float64) * (2.0 / (1 << 24)) - 1.0
    return (unit * bound).astype(np.float32).reshape(shape)


def _tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    fan_in = shape[-1]
    # Unit-variance activations for projections; embeddings a little larger so
    # different prompts give visibly different continuations.
    bound = 1.7 if name == "model.embed_tokens.weight" else 2.0 * (3.0 / fan_in) ** 0.5
    return _uniform(name, shape, bound)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_json() -> dict:
    """A byte-level BPE with no merges: one token per UTF-8 byte, plus special tokens."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [
        {"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _config_json(preset: Preset) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": BOS_ID + 2,
        "torch_dtype": preset.dtype,
    }


def _text_files(preset: Preset) -> dict[str, dict]:
    return {
        "config.json": _config_json(preset),
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_TURN_ID]},
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[1],
            "pad_token": SPECIAL_TOKENS[2],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": preset.max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        },
    }


def _shards(preset: Preset) -> list[list[str]]:
    """Group weight names into shards of at most `max_shard_bytes`, in a fixed order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in preset.param_shapes().items():
        nbytes = int(np.prod(shape)) * preset.bytes_per_param
        if shards[-1] and size + nbytes > preset.max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(path: Path, names: list[str], preset: Preset) -> None:
    shapes = preset.param_shapes()
    if preset.dtype == "float32":
        from safetensors.numpy import save_file

        save_file({n: _tensor(n, shapes[n]) for n in names}, str(path), metadata={"format": "pt"})
    else:
        import torch
        from safetensors.torch import save_file as save_torch

        tensors = {n: torch.from_numpy(_tensor(n, shapes[n])).to(torch.bfloat16) for n in names}
        save_torch(tensors, str(path), metadata={"format": "pt"})


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build(preset_name: str, out_dir: str | os.PathLike, progress: Callable[[str], None] | None = None) -> Path:
    """Write the preset's model into `out_dir` atomically (built beside it, then renamed).

    An existing complete model there is kept as is, so concurrent builders are safe.
    """
    preset = PRESETS[preset_name]
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in _text_files(preset).items():
            _dump(tmp / name, data)
        shards = _shards(preset)
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
        ]
        for fname, names in zip(files, shards):
            if progress:
                progress(f"writing {fname} ({len(names)} tensors)")
            _write_shard(tmp / fname, names, preset)
        if len(files) > 1:
            weight_map = {n: f for f, names in zip(files, shards) for n in names}
            _dump(tmp / "model.safetensors.index.json", {"metadata": {"total_size": preset.weight_bytes()}, "weight_map": weight_map})
        for path in tmp.iterdir():  # mkdtemp and safetensors make owner-only files
            path.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # lost a race to nothing: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def file_digests(model_dir: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(file name, sha256) of every file in a model directory, sorted by name."""
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            yield path.name, h.hexdigest()


def source_dir(source: str, cache_root: Path) -> Path:
    """Where a model `source`'s files are on this node (a demo model's once built), without building it."""
    if source.startswith("demo://"):
        return cache_root / "demo" / source.removeprefix("demo://")
    return Path(source.removeprefix("file://")).expanduser()


def resolve_source(source: str, cache_root: Path) -> Path:
    """Turn a model `source` into a local directory, building the demo model if asked."""
    if source.startswith("demo://"):
        return build(source.removeprefix("demo://"), source_dir(source, cache_root))
    return source_dir(source, cache_root)
