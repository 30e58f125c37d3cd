"""Which decoder architectures a stage can run, and the transformers classes that build them.

A stage reuses transformers' own decoder layers, RMSNorm and rotary embedding, so every family
here must call `past_key_values.update(k, v, layer_idx)` and attend with the mask it is given
(true of the Llama family in transformers 5.x).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .resolve import ModelError

# config.model_type -> (transformers module, class-name prefix)
SUPPORTED = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}


@dataclass(frozen=True)
class Architecture:
    decoder_layer: type
    norm: type
    rotary: type


def architecture(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ModelError(
            f"unsupported architecture {model_type!r}: hetserve runs {', '.join(sorted(SUPPORTED))}"
        )
    module_name, prefix = SUPPORTED[model_type]
    module = importlib.import_module(module_name)
    return Architecture(
        decoder_layer=getattr(module, f"{prefix}DecoderLayer"),
        norm=getattr(module, f"{prefix}RMSNorm"),
        rotary=getattr(module, f"{prefix}RotaryEmbedding"),
    )


def attention_window(config) -> int | None:
    """The sliding-window length where the model uses one, else None.

    Our attention mask is full-causal, which equals sliding-window attention as long as no
    sequence is longer than the window; callers cap the context there.
    """
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    return window or None
