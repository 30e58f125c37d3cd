"""Weight-only int8 / int4 linears (model/weight_only.py) on the CPU: conversion from quanto's
modules keeps their values, only the layers meant are swapped, fusion keeps outputs and shares
memory, and the tile choice. The Triton kernels run on a GPU (tests/test_gpu_decode.py)."""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import freeze, qint4, qint8, quantize

from hetserve.model import weight_only
from hetserve.model.cpu_linear import CpuLinear
from hetserve.model.weight_only import WeightOnlyLinear
from hetserve.model.weight_only_kernels import TileConfig, tile_config


def quantized(n: int, k: int, qtype, dtype=torch.float32, bias=True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias, dtype=dtype))
    quantize(module, weights=qtype)
    freeze(module)
    return module


def converted(module: torch.nn.Sequential) -> WeightOnlyLinear:
    """Ours for the module's int8 or int4 weight (int4 in quanto's tinygemm layout for bf16, its
    plain one for float32)."""
    return weight_only.from_quanto(module[0])


@pytest.mark.parametrize("qtype, dtype", [(qint8, torch.float32), (qint8, torch.bfloat16), (qint4, torch.bfloat16)],
                         ids=["int8-fp32", "int8-bf16", "int4-bf16"])
def test_conversion_keeps_quantized_values(qtype, dtype):
    module = quantized(96, 256, qtype, dtype)
    ours = converted(module)
    assert isinstance(ours, WeightOnlyLinear) and ours.bits == (8 if qtype == qint8 else 4)
    plain = module[0].weight
    if qtype == qint4:
        plain = plain.weight_qbits_tensor()  # tinygemm's layout back to quanto's plain one
    torch.testing.assert_close(ours.dequantized().float(), plain.dequantize().float(), rtol=0, atol=0.02)
    x = torch.randn(3, 256, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).float(), module(x).float(), rtol=0.02, atol=0.02)
    if qtype == qint4:  # two values a byte, groups of 128 along K
        assert ours.weight.shape == (96, 128) and ours.weight.dtype == torch.uint8 and ours.scale.shape == (96, 2)
    else:
        assert ours.weight.data_ptr() == module[0].weight._data.data_ptr()  # quanto's int8 tensor, not a copy


def test_replace_swaps_weight_only_int8_and_int4_and_keeps_other_quanto_layers():
    layers = torch.nn.ModuleDict({name: torch.nn.Linear(256, 64) for name in ("a", "b", "c", "d", "e")})
    quantize(layers, weights=qint8, include=["a"])
    quantize(layers, weights=qint4, include=["b"])  # quanto's plain layout on a CPU
    quantize(layers, weights=qint8, activations=qint8, include=["c"])  # w8a8 keeps quanto's module
    layers["e"] = torch.nn.Linear(128, 64)
    quantize(layers, weights=qint4, include=["e"])  # K = 128: one group per row, quanto quantizes per axis
    freeze(layers)
    assert weight_only.replace_quanto_linears(layers) == 2
    assert [type(layers[n]).__name__ for n in "abcde"] == ["WeightOnlyLinear", "WeightOnlyLinear", "QLinear",
                                                          "Linear", "QLinear"]
    assert layers["b"].bits == 4 and layers["b"].group == 128


def test_int4_bytes_hold_a_groups_halves_side_by_side():
    """Byte j of a group holds its value j in the low nibble and G/2 + j in the high one: the
    layout the int4 kernel reads without shuffles (model/weight_only.py)."""
    module = quantized(32, 512, qint4)
    ours = converted(module)
    q = module[0].weight._data.unpack().reshape(32, 4, 128)  # quanto's values, in K order
    packed = ours.weight.view(32, 4, 64)
    assert torch.equal(packed & 0xF, q[..., :64].to(torch.uint8))
    assert torch.equal(packed >> 4, q[..., 64:].to(torch.uint8))


@pytest.mark.parametrize("qtype", [qint8, qint4], ids=["int8", "int4"])
def test_fused_projections_compute_the_parts_side_by_side_in_shared_memory(qtype):
    parts = [converted(quantized(n, 256, qtype, torch.bfloat16)) for n in (128, 32, 32)]
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = torch.cat([m(x) for m in parts], dim=-1)
        assert weight_only.fusable(*parts)
        fused = weight_only.fuse(*parts)
        torch.testing.assert_close(fused(x), want)
        torch.testing.assert_close(torch.cat([m(x) for m in parts], dim=-1), want)  # parts still work
    assert parts[1].weight.data_ptr() == fused.weight[128:].data_ptr()  # a view: stored once
    if qtype == qint4:  # scales and zeros stay group-major: a group's values for all rows side by side
        assert fused.scale.stride() == (1, 192) and parts[1].zero.stride() == (1, 192)
    other = converted(quantized(32, 256, qint4 if qtype == qint8 else qint8, torch.bfloat16))
    assert not weight_only.fusable(parts[0], other)


def test_int8_tiles_follow_the_rows_and_the_shape():
    # o_proj, q|k|v, gate|up of a Llama-3-8B shape at 1 row: 32 columns a program, no split
    assert tile_config(1, 4096, 4096) == TileConfig(16, 32, 256, 1, 4, 4)
    # down (K = 14336): split in 4
    assert tile_config(16, 14336, 4096) == TileConfig(16, 64, 256, 4, 4, 4)
    assert tile_config(1, 576, 1536).split_k == 1
    # 17-64 rows: K blocks of 64, split in 4, gate|up's long N wider and unsplit
    assert tile_config(64, 14336, 4096) == TileConfig(64, 64, 64, 4, 4, 4)
    assert tile_config(33, 4096, 6144) == TileConfig(64, 64, 64, 4, 4, 4)
    assert tile_config(20, 4096, 6144).block_m == 32
    assert tile_config(64, 4096, 28672) == TileConfig(64, 128, 64, 1, 4, 4)
    # past 64 rows: blocks of 128 rows, split in 2 while the tiles give few programs
    assert tile_config(128, 4096, 4096) == TileConfig(128, 64, 64, 2, 4, 4)  # 64 programs
    assert tile_config(256, 4096, 6144) == TileConfig(128, 64, 64, 1, 4, 4)  # 192 programs
    assert tile_config(256, 4096, 28672) == TileConfig(128, 128, 64, 1, 8, 4)
    assert all(not tile_config(rows, 4096, n).swap for rows in (1, 16, 64, 256) for n in (4096, 28672))


def test_a_kernel_failure_is_reported_once_with_its_reason(monkeypatch):
    calls = []

    def out_of_resources(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("out of resource: shared memory, Required: 163840, Hardware limit: 101376")

    monkeypatch.setattr(weight_only, "available", lambda device: True)  # as on a GPU
    monkeypatch.setattr(weight_only, "int8_matmul", out_of_resources)
    monkeypatch.setattr(weight_only, "_FAILURES", {})
    device = torch.device("cpu")
    assert weight_only.kernel_failure(device, torch.float32).startswith("RuntimeError: out of resource")
    assert weight_only.kernel_failure(device, torch.float32) is not None and len(calls) == 1  # cached


def test_stage_swaps_int8_layers_only_where_the_kernels_run(tmp_path, monkeypatch, caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hetserve.model.stage import StageModel, StageSpec

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    spec = StageSpec(0, 2, first=True, last=True, max_seqs=2, max_context=64, precisions=("int8", "native"))
    monkeypatch.setattr(weight_only, "available", lambda device: True)  # as on a GPU
    monkeypatch.setattr(weight_only, "kernel_failure", lambda device, dtype: "OutOfResources: shared memory")
    kept = StageModel(tmp_path, spec, "cpu")
    assert type(kept.layers[0].self_attn.q_proj).__name__ == "QLinear"
    assert "quanto's kernels serve" in caplog.text and "OutOfResources" in caplog.text
    monkeypatch.setattr(weight_only, "kernel_failure", lambda device, dtype: None)
    asked = StageModel(tmp_path, spec, "cpu", quanto_kernels=True)  # join --quanto-kernels
    assert type(asked.layers[0].self_attn.q_proj).__name__ == "QLinear"
    swapped = StageModel(tmp_path, spec, "cpu")
    assert type(swapped.layers[0].mlp.down_proj).__name__ == "WeightOnlyLinear"
    assert type(swapped.layers[1].mlp.down_proj) is CpuLinear  # the native layer: plain (on a CPU, cpu_linear.py's)
    assert isinstance(swapped.decode_layers.layers[0].qkv, WeightOnlyLinear)  # fused like bf16 ones
    # the same int8 tensors and scales, stored once though fused (quanto's modules also hold two
    # float32 activation scales each, unused by weight-only layers)
    assert kept.weight_bytes - 7 * 2 * 4 == swapped.weight_bytes


def test_tiles_keep_the_stages_that_fit_the_devices_shared_memory():
    """An H100's float32 stage failed to launch the int4 128 x 128 tile (283 KB at 4 stages)."""
    from hetserve.model.weight_only_kernels import fitting_stages, int4_tile_config, tile_config

    hopper, ada = 232448, 101376  # bytes a program may take: H100 / H200, RTX 4090
    big = int4_tile_config(128, 4096, 28672, 128)
    assert fitting_stages(big, 4, 2, hopper) == big  # the tiles were swept in bf16 on Hopper
    assert fitting_stages(big, 4, 4, hopper).stages == 2
    assert fitting_stages(big, 4, 2, ada).stages == 2
    assert fitting_stages(tile_config(200, 4096, 28672), 8, 2, hopper) == tile_config(200, 4096, 28672)
    assert fitting_stages(big, 4, 4, 20000).stages == 1  # never fewer than one


def test_int4_tiles_by_rows_and_the_groups_the_kernels_take():
    from hetserve.model.weight_only_kernels import int4_kernel_fits, int4_tile_config

    # 1-16 rows: plain tiles over two groups a step, 32 columns for a long K, split but for a long
    # N; 17-64: transposed ones over one group, 3 stages, split but gate|up's, 128 weight rows on 8
    # warps; 65-128: 128 x 128 past N = 4096
    assert int4_tile_config(1, 4096, 6144, 128) == int4_tile_config(16, 4096, 6144, 128)
    assert int4_tile_config(16, 4096, 4096, 128) == TileConfig(16, 64, 256, 4, 4, 4)
    assert int4_tile_config(1, 14336, 4096, 128) == TileConfig(16, 32, 256, 4, 4, 4)
    assert int4_tile_config(1, 4096, 28672, 128).split_k == 1
    assert int4_tile_config(64, 4096, 28672, 128) == TileConfig(64, 128, 128, 1, 8, 3, swap=True)
    assert int4_tile_config(40, 4096, 6144, 128).split_k == 4
    assert int4_tile_config(40, 14336, 4096, 128) == TileConfig(64, 64, 128, 4, 4, 3, swap=True)
    assert int4_tile_config(100, 4096, 4096, 128) == TileConfig(64, 64, 128, 2, 4, 4, swap=True)
    assert int4_tile_config(128, 4096, 28672, 128) == TileConfig(128, 128, 128, 1, 8, 4, swap=True)
    assert [int4_kernel_fits(g) for g in (16, 32, 96, 128)] == [False, True, False, True]
