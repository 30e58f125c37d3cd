"""Weight-only int8 / int4 linears (model/weight_only.py) on the CPU: conversion from quanto's
modules keeps their values, only the layers meant are swapped, fusion keeps outputs and shares
memory, and the tile choice. The Triton kernels run on a GPU (tests/test_gpu_decode.py)."""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import freeze, qint4, qint8, quantize

from hetserve.model import weight_only
from hetserve.model.weight_only import TileConfig, WeightOnlyLinear, tile_config


def quantized(n: int, k: int, qtype, dtype=torch.float32, bias=True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias, dtype=dtype))
    quantize(module, weights=qtype)
    freeze(module)
    return module


def converted(module: torch.nn.Sequential) -> WeightOnlyLinear:
    """Ours for the module's int8 or int4 weight (int4 in any of quanto's layouts: on a GPU only
    its AWQ layout is converted, which exists only there)."""
    linear = module[0]
    if linear.weight.qtype == qint8:
        return weight_only.from_quanto(linear)
    return weight_only.int4_from_quanto(linear.weight, linear.bias.data)


@pytest.mark.parametrize("qtype", [qint8, qint4], ids=["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 int4: quanto's tinygemm layout
def test_conversion_keeps_quantized_values(qtype, dtype):
    module = quantized(96, 256, qtype, dtype)
    ours = converted(module)
    assert isinstance(ours, WeightOnlyLinear) and ours.bits == (8 if qtype == qint8 else 4)
    plain = module[0].weight
    if type(plain).__name__ not in ("WeightQBitsTensor", "WeightQBytesTensor"):
        plain = plain.weight_qbits_tensor()
    torch.testing.assert_close(ours.dequantized().float(), plain.dequantize().float(), rtol=0, atol=0.02)
    x = torch.randn(3, 256, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).float(), module(x).float(), rtol=0.02, atol=0.02)
    if qtype == qint4:  # two values a byte, groups of 128 along K
        assert ours.weight.shape == (96, 128) and ours.weight.dtype == torch.uint8 and ours.scale.shape == (96, 2)
    else:
        assert ours.weight.data_ptr() == module[0].weight._data.data_ptr()  # quanto's int8 tensor, not a copy


def test_replace_swaps_weight_only_int8_and_keeps_other_quanto_layers():
    layers = torch.nn.ModuleDict({name: torch.nn.Linear(256, 64) for name in ("a", "b", "c", "d")})
    quantize(layers, weights=qint8, include=["a"])
    quantize(layers, weights=qint4, include=["b"])  # not the AWQ layout (a CPU has none): tinygemm stays
    quantize(layers, weights=qint8, activations=qint8, include=["c"])  # w8a8 keeps quanto's module
    freeze(layers)
    assert weight_only.replace_quanto_linears(layers) == 1
    assert [type(layers[n]).__name__ for n in "abcd"] == ["WeightOnlyLinear", "QLinear", "QLinear", "Linear"]


@pytest.mark.parametrize("qtype", [qint8, qint4], ids=["int8", "int4"])
def test_fused_projections_compute_the_parts_side_by_side_in_shared_memory(qtype):
    parts = [converted(quantized(n, 256, qtype)) for n in (128, 32, 32)]
    x = torch.randn(4, 256)
    with torch.no_grad():
        want = torch.cat([m(x) for m in parts], dim=-1)
        assert weight_only.fusable(*parts)
        fused = weight_only.fuse(*parts)
        torch.testing.assert_close(fused(x), want)
        torch.testing.assert_close(torch.cat([m(x) for m in parts], dim=-1), want)  # parts still work
    assert parts[1].weight.data_ptr() == fused.weight[128:].data_ptr()  # a view: stored once
    assert not weight_only.fusable(parts[0], converted(quantized(32, 256, qint4 if qtype == qint8 else qint8)))


def test_int4_groups_not_a_multiple_of_32_keep_quantos_module():
    module = quantized(64, 80, qint4)  # K = 80 <= 128: one group of 80 per row
    assert weight_only.int4_from_quanto(module[0].weight, None) is None


def test_tiles_stream_long_k_blocks_and_split_only_long_k():
    # o_proj, q|k|v, gate|up of a Llama-3-8B shape at 1 row: 32 columns a program, no split
    assert tile_config(1, 4096, 4096) == TileConfig(16, 32, 256, 1, 4, 4)
    # down (K = 14336): split in 4
    assert tile_config(16, 4096, 14336) == TileConfig(16, 64, 256, 4, 4, 4)
    assert tile_config(64, 28672, 4096) == TileConfig(64, 64, 128, 1, 4, 4)
    assert tile_config(128, 28672, 4096).block_m == 64
    assert tile_config(1, 576, 576).split_k == 1
