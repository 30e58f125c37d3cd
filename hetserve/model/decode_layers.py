"""The decoder layers of a decode step, written out so that their small kernels fuse.

Why: in a CUDA graph a kernel still costs its launch and its ramp, a few microseconds each, and
transformers' Llama layer is ~50 kernels per token step, most of them tiny elementwise ones
(RMSNorm alone is six: cast, square, mean, rsqrt, two multiplies). For a Llama-3-8B shape on an
H200 that was 421 kernels per 8-layer step and 2.2x the weight-reading floor (docs/benchmarks.md).
Here a layer is:
  add + RMSNorm (one fused kernel) -> q|k|v projection (one matmul where the weights are plain)
  -> split, per-head norms (Qwen3), rotary (one fused kernel) -> K/V cache write -> attention
  (on a GPU, decode: rotary, the K/V write and attention in one Triton kernel) -> o_proj
  -> add + RMSNorm (fused) -> gate|up projection (one matmul) -> SiLU * up (fused)
  -> down projection; its residual add fuses into the next layer's norm.
The elementwise parts are plain torch functions, compiled with torch.compile (Inductor fuses
each into one Triton kernel) where `compile` is set, which a stage does when it captures CUDA
graphs; elsewhere (CPU, tests) they run eagerly, op for op what transformers computes.
Matmuls stay the modules' own calls: on a GPU weight-only int8 and int4 layers run
weight_only.py's kernels, other quantized ones quanto's.

Fused projections: where q/k/v (and gate/up) are plain nn.Linear, or weight_only.py linears of one
kind, their weights (and scales) are copied once into one tensor of out_q + out_k + out_v rows
and the modules' become row views of it, so prefill (transformers' layers) and decode read the
same memory and nothing is stored twice.

Prefill steps on a GPU run through the same layers, one row per prompt token (static_steps.py).

Only layers of the shape written out here take this path (the Llama family as transformers 5
writes it: llama, mistral, qwen2 with q/k/v biases, qwen3 with per-head q/k norms, SiLU MLP);
`DecodeLayers.supports` says which, and others keep transformers' own layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import slot_attention, weight_only
from .kv_cache import SlotKVCache, StepLayout

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, same ops in the same order: x [..., H] -> [..., H]."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm: -> (x + delta, rms_norm(x + delta)), both [..., H]."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def head_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int):
    """q [b, 1, Hq*D], k and v [b, 1, Hkv*D] -> views q, k, v [b, heads, 1, D] (no copy)."""
    rows = q.shape[0]
    return tuple(t.view(rows, 1, -1, head_dim).transpose(1, 2) for t in (q, k, v))


def split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_dim: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float):
    """q [b, 1, Hq*D], k and v [b, 1, Hkv*D] (projections), cos and sin [b, 1, D] ->
    q, k, v [b, heads, 1, D], with the per-head norms (Qwen3) and rotary applied to q and k."""
    q, k, v = head_views(q, k, v, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, 1, D]: one position per row
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _plain_linears(*linears: torch.nn.Module) -> bool:
    """Plain nn.Linear of one dtype and device, all with or all without bias (quanto's QLinear
    subclasses nn.Linear, hence the exact type)."""
    first = linears[0]
    return all(type(m) is torch.nn.Linear and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


def _fuse(*linears: torch.nn.Module) -> torch.nn.Module | None:
    """One linear computing all of `linears` side by side, their weights become views of its; None
    where they cannot be fused (quanto's modules, mixed kinds)."""
    if weight_only.fusable(*linears):
        return weight_only.fuse(*linears)
    if not _plain_linears(*linears):
        return None
    weight = torch.cat([m.weight.data for m in linears])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None,
                            device="meta", dtype=weight.dtype)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False)
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused.weight.data[row:row + rows], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(fused.bias.data[row:row + rows], requires_grad=False)
        row += rows
    return fused


_COMPILED: dict = {}  # function -> its compiled form, one per process


def _compiled(fn):
    """fn compiled once per process and shared by every stage model: a fresh torch.compile per
    model would compile again, and past dynamo's recompile limit fall back to eager. dynamic:
    one compiled kernel serves every batch bucket and every layer (whose tensors are arguments)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


class _Layer:
    """One decoder layer's parts, as the decode step calls them."""

    def __init__(self, layer: torch.nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.q_norm = attn.q_norm.weight if hasattr(attn, "q_norm") else None
        self.k_norm = attn.k_norm.weight if hasattr(attn, "k_norm") else None
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def projections(self, x: torch.Tensor):
        """x [b, 1, H] -> q, k, v projections [b, 1, out]."""
        if self.qkv is not None:
            return self.qkv(x).split(self.sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def gate_and_up(self, x: torch.Tensor):
        if self.gate_up is not None:
            return self.gate_up(x).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)

    def linears(self) -> list[torch.nn.Module]:
        """Every projection module this layer calls, the fused ones included."""
        return [m for m in (self.qkv, self.gate_up, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                            self.gate_proj, self.up_proj, self.down_proj) if m is not None]


class DecodeLayers:
    """A stage's decoder layers for one-token-per-row steps: hidden [b, 1, H] -> [b, 1, H]."""

    def __init__(self, layers: torch.nn.ModuleList, compile: bool):
        self.layers = [_Layer(layer) for layer in layers]
        self.compiled = compile
        # With compiled steps on a GPU, attention and the K/V write are one Triton kernel that
        # reads the cache in place (slot_attention.py); else gather + SDPA, as transformers does.
        weight = layers[0].self_attn.o_proj.weight
        self.in_place_attention = compile and slot_attention.available(weight.device, self.layers[0].head_dim)
        fused = _compiled if compile else (lambda fn: fn)
        self._norm, self._add_norm = fused(rms_norm), fused(add_rms_norm)
        self._split_heads, self._silu_mul = fused(split_heads), fused(silu_mul)

    def linears(self) -> list[torch.nn.Module]:
        return [m for layer in self.layers for m in layer.linears()]

    @staticmethod
    def supports(layers: torch.nn.ModuleList, config) -> bool:
        """Whether every layer is of the shape written out here (else: transformers' own layers)."""
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return False
        parts = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for layer in layers:
            names = dict(layer.named_modules())
            extra_norms = {"self_attn.q_norm", "self_attn.k_norm"} & set(names)
            if not all(p in names for p in parts) or len(extra_norms) == 1:
                return False
        return True

    def __call__(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: SlotKVCache,
                 layout: StepLayout) -> torch.Tensor:
        delta = None
        for index, layer in enumerate(self.layers):
            if delta is None:
                normed = self._norm(hidden, layer.input_norm, layer.eps)
            else:
                hidden, normed = self._add_norm(hidden, delta, layer.input_norm, layer.eps)
            attended = self._attention(layer, index, normed, cos_sin, cache, layout)  # [b, 1, Hq*D]
            hidden, normed = self._add_norm(hidden, layer.o_proj(attended), layer.post_norm, layer.eps)
            delta = layer.down_proj(self._silu_mul(*layer.gate_and_up(normed)))
        return hidden + delta

    def _attention(self, layer: _Layer, index: int, normed: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                   cache: SlotKVCache, layout: StepLayout) -> torch.Tensor:
        """normed [b, 1, H] -> attention output [b, 1, Hq*D]; the step's K/V land in the cache."""
        projections = layer.projections(normed)
        if self.in_place_attention and not layout.shared_slots and layer.q_norm is None:
            q, k, v = head_views(*projections, layer.head_dim)  # [b, heads, 1, D]
            # decode: rotary, the K/V write and attention are one kernel
            return slot_attention.slot_decode_attention(
                q, k, v, cache.keys[index], cache.values[index], layout.slots, layout.starts, layout.lengths,
                cache.scratch, layer.scaling, rotary=cos_sin)
        q, k, v = self._split_heads(*projections, *cos_sin, layer.head_dim, layer.q_norm, layer.k_norm, layer.eps)
        if not self.in_place_attention:
            keys, values = cache.update(k, v, index)  # [b, Hkv, L, D]
            return grouped_decode(q, keys, values, layout.attention_mask, layer.scaling)
        if layout.shared_slots:  # prompt tokens: all K/V written before any row attends
            cache.write(k, v, index)
            return slot_attention.slot_prefill_attention(q, cache.keys[index], cache.values[index], layout.slots,
                                                         layout.starts, layout.lengths, layer.scaling)
        return slot_attention.slot_decode_attention(
            q, k, v, cache.keys[index], cache.values[index], layout.slots, layout.starts, layout.lengths,
            cache.scratch, layer.scaling)


def grouped_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float | None) -> torch.Tensor:
    """q [b, Hq, 1, D] against keys/values [b, Hkv, L, D] and mask [b, 1, 1, L] (None: every key)
    -> [b, 1, Hq*D].
    The query heads of one K/V head stand in for query positions (attention.py says why)."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # query head h uses K/V head h // group
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(rows, 1, heads * dim)
