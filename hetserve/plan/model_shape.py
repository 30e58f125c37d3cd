"""A model's shape from its config alone (no weights): parameters and bytes per decoder layer at
each precision, KV-cache bytes per token, embedding and head, for offline planning.

Built-in configs (hetserve/data/model_configs/*.json) carry the published hyper-parameters of
OPT-30B/66B, BLOOM-176B and Llama-3-8B/70B; any Hugging Face config.json of the OPT, BLOOM or
Llama families (llama, mistral, qwen2, qwen3) works too.

Quantized bytes follow optimum-quanto's storage, which `hetserve profile` measured on the
Llama-3-8B layer to the byte (tests/test_model_shape.py): int8 and fp8 keep one byte per weight
plus one compute-dtype scale per output row; int4 keeps half a byte per weight plus a scale and a
shift per group of 128 weights. Biases and norms stay in the compute dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .cost import LayerShape

CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "model_configs"
INT4_GROUP = 128
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


class ModelConfigError(ValueError):
    """A config that cannot be found or read, or an architecture without a shape formula."""


@dataclass(frozen=True)
class ConfigShape:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    linear_params: int  # per decoder layer: weights of its linear layers (what quantization shrinks)
    linear_rows: int  # per decoder layer: output features of those linear layers (one scale each)
    other_params: int  # per decoder layer: biases and norms
    kv_dim: int  # width of K (and of V) per token in one layer: kv heads x head dim
    embed_params: int  # token (and position) embeddings, and an embedding norm where there is one
    lm_head_params: int
    final_norm_params: int
    tied: bool  # the head shares the embedding's weights (one copy in the model, one per stage that needs it)

    @property
    def layer_params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def head_params(self) -> int:
        return self.lm_head_params + self.final_norm_params

    @property
    def total_params(self) -> int:
        return (self.num_layers * self.layer_params + self.embed_params + self.final_norm_params
                + (0 if self.tied else self.lm_head_params))


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(spec: str) -> tuple[str, dict]:
    """(name, config dict) from a built-in name, a config.json file, or a directory holding one."""
    builtin = CONFIG_DIR / f"{spec}.json"
    path = builtin if builtin.is_file() else Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"no model config {spec!r}: give a built-in name ({', '.join(builtin_configs())}), "
                               "a config.json or a directory holding one")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path} is not a JSON object")
    name = spec if builtin.is_file() else config.get("_name_or_path") or path.parent.name
    return name, config


def _get(config: dict, *keys: str, default=None):
    """The first of several spellings a field has across families (BLOOM says n_embed, n_layer)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ModelConfigError(f"the config has no {keys[0]}")


def config_shape(name: str, config: dict) -> ConfigShape:
    model_type = config.get("model_type")
    h = int(_get(config, "hidden_size", "n_embed", "d_model"))
    layers = int(_get(config, "num_hidden_layers", "n_layer"))
    heads = int(_get(config, "num_attention_heads", "n_head"))
    vocab = int(_get(config, "vocab_size"))
    if model_type == "opt":
        if _get(config, "word_embed_proj_dim", default=h) != h:
            raise ModelConfigError("OPT configs with a projected embedding (opt-350m) are not supported")
        ffn = int(_get(config, "ffn_dim"))
        bias = bool(_get(config, "enable_bias", default=True))
        # q, k, v, out projections, fc1, fc2; two layer norms (weight and bias)
        return ConfigShape(name, model_type, layers, h, linear_params=4 * h * h + 2 * h * ffn,
                           linear_rows=5 * h + ffn, other_params=(5 * h + ffn) * bias + 4 * h, kv_dim=h,
                           # learned positions have 2 extra rows (OPT offsets positions by 2)
                           embed_params=vocab * h + (int(_get(config, "max_position_embeddings")) + 2) * h,
                           lm_head_params=vocab * h, final_norm_params=2 * h,
                           tied=bool(_get(config, "tie_word_embeddings", default=True)))
    if model_type == "bloom":
        # fused query_key_value, dense, dense_h_to_4h, dense_4h_to_h, all with biases; two layer norms
        return ConfigShape(name, model_type, layers, h, linear_params=12 * h * h, linear_rows=9 * h,
                           other_params=9 * h + 4 * h, kv_dim=h,
                           embed_params=vocab * h + 2 * h,  # + word_embeddings_layernorm (ALiBi: no positions)
                           lm_head_params=vocab * h, final_norm_params=2 * h,
                           tied=bool(_get(config, "tie_word_embeddings", default=True)))
    if model_type in LLAMA_FAMILY:
        head_dim = int(_get(config, "head_dim", default=h // heads))
        kv_heads = int(_get(config, "num_key_value_heads", default=heads))
        inter = int(_get(config, "intermediate_size"))
        q, kv = heads * head_dim, kv_heads * head_dim
        attn_bias = model_type == "qwen2" or bool(config.get("attention_bias"))
        other = 2 * h  # input and post-attention RMSNorm
        other += (q + 2 * kv) * attn_bias + h * bool(config.get("attention_bias"))  # qwen2: q/k/v only
        other += (2 * inter + h) * bool(config.get("mlp_bias"))
        other += 2 * head_dim * (model_type == "qwen3")  # q_norm, k_norm
        return ConfigShape(name, model_type, layers, h, linear_params=2 * h * q + 2 * h * kv + 3 * h * inter,
                           linear_rows=q + 2 * kv + h + 2 * inter + h, other_params=other, kv_dim=kv,
                           embed_params=vocab * h, lm_head_params=vocab * h, final_norm_params=h,
                           tied=bool(_get(config, "tie_word_embeddings", default=False)))
    raise ModelConfigError(f"no shape formula for architecture {model_type!r}: "
                           f"known are bloom, opt, {', '.join(LLAMA_FAMILY)}")


def layer_weight_bytes(shape: ConfigShape, precision: str, itemsize: int) -> int:
    if precision == "native":
        return shape.layer_params * itemsize
    if precision in ("int8", "fp8"):
        linear = shape.linear_params + shape.linear_rows * itemsize
    elif precision == "int4":
        linear = shape.linear_params // 2 + (shape.linear_params // INT4_GROUP) * 2 * itemsize
    else:
        raise ModelConfigError(f"unknown precision {precision!r}")
    return linear + shape.other_params * itemsize


def kv_bytes_per_token(shape: ConfigShape, itemsize: int) -> int:
    """K and V of one token in one layer."""
    return 2 * shape.kv_dim * itemsize


def layer_shape(shape: ConfigShape, precisions: list[str], itemsize: int) -> LayerShape:
    """What the roofline needs, for the precisions a device runs."""
    return LayerShape(shape.layer_params, shape.hidden_size, kv_bytes_per_token(shape, itemsize),
                      {p: layer_weight_bytes(shape, p, itemsize) for p in precisions})
