"""Decode attention without repeating the key/value heads (registered with transformers as "hetserve").

transformers' SDPA path expands grouped-query K/V to every query head (`repeat_kv`) whenever an
attention mask is given, and a stage always gives one (rows sit at different positions). For a
Llama-3-8B shape that is a 4x copy of the K/V read per layer: at 64 rows x 256 context about
8 GB of extra traffic per decode step on a GPU. With one query token per row, the query heads of
one K/V head can stand in for query positions instead: q [B, Hq, 1, D] -> [B, Hkv, Hq/Hkv, D]
against K/V [B, Hkv, L, D], one mask [B, 1, 1, L] for all of them. Everything else (prefill, no
grouping) goes through transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .decode_layers import grouped_decode

NAME = "hetserve"


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, L, D], mask [B, 1, T, L] -> ([B, T, Hq, D], None)."""
    rows, heads, steps, dim = query.shape
    kv_heads = key.shape[1]
    if steps != 1 or kv_heads == heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return grouped_decode(query, key, value, attention_mask, scaling).view(rows, 1, heads, dim), None


AttentionInterface.register(NAME, grouped_decode_attention)
