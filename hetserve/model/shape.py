"""A model's memory shape from its config and safetensors headers, without loading weights."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..plan.split import ModelShape
from .stage import DTYPES, load_config, tensor_index


def model_shape(model_dir: Path, dtype: str) -> ModelShape:
    config = load_config(model_dir)
    itemsize = DTYPES[dtype].itemsize
    counts: dict[str, int] = {}
    for name, file in tensor_index(model_dir).items():
        with safe_open(file, framework="pt") as f:
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
        counts[name] = n
    layer0 = sum(n for name, n in counts.items() if name.startswith("model.layers.0."))
    embed = counts["model.embed_tokens.weight"]
    head = counts.get("lm_head.weight", embed) + counts.get("model.norm.weight", 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        layer_bytes=layer0 * itemsize,
        embed_bytes=embed * itemsize,
        head_bytes=head * itemsize,
        kv_bytes_per_token=2 * config.num_key_value_heads * head_dim * itemsize,
    )
