"""On a GPU: decode and prefill steps replayed from CUDA graphs, through the written-out layers
compiled with torch.compile, the Triton attention and our int8 / int4 matmuls, agree with
transformers' layers run eagerly with quanto's matmuls (its int8 kernel, tinygemm for int4).
Skipped without CUDA (CI has none); run on the GPU machine with
`python -m pytest tests/test_gpu_decode.py`.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hetserve.model.stage import StageModel, StageSpec
from hetserve.model.static_steps import TOKEN_BUCKETS, BucketKey

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             vocab_size=512, max_position_embeddings=1024)


@pytest.fixture(scope="module", params=[2, 8], ids=["gqa", "mha"])
def model_dir(tmp_path_factory, request):
    """Llama with 8 query heads over 2 K/V heads (grouped) or over 8 (one each)."""
    path = tmp_path_factory.mktemp("gpu-model")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SHAPE, num_key_value_heads=request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("precision", ["native", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_graph_decode_matches_transformers_layers(model_dir, precision, rows):
    """Rows in scattered slots of 16, at positions past several key blocks of the attention kernel."""
    spec = StageSpec(0, 4, first=True, last=False, dtype="bfloat16", max_seqs=16, max_context=512,
                     precisions=(precision,) * 4)
    graphs = StageModel(model_dir, spec, "cuda")
    eager = StageModel(model_dir, spec, "cuda", cuda_graphs=False, quanto_kernels=True)  # quanto's matmuls
    assert graphs.decode_layers.compiled and graphs.decode_reads_cache_in_place
    slots = list(range(1, 2 * rows, 2))[:rows]
    prompts = [60 + 37 * i for i in range(rows)]  # rows at different positions
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, max(prompts)), device="cuda")

    def column(values):
        return torch.tensor(values, dtype=torch.int64, device="cuda")

    for model in (graphs, eager):
        model.forward(column(slots), column([0] * rows), column(prompts), ids)
    step = torch.randint(0, SHAPE["vocab_size"], (rows, 1), device="cuda")
    for i in range(3):  # the first step captures the graph, the next ones replay it
        starts = [p + i for p in prompts]
        got = graphs.decode(slots, starts, step)
        want = eager.forward(column(slots), column(starts), column([1] * rows), step)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    assert graphs.static_steps.captured == [(min(b for b in (1, 4, 8) if b >= rows), 512, False, False)]
    for got_k, want_k in zip(graphs.cache.keys, eager.cache.keys):  # the kernel wrote the new K/V
        torch.testing.assert_close(got_k[:, :, :512], want_k[:, :, :512], rtol=0.05, atol=0.05)  # not scratch


def test_warm_up_captures_every_batch_bucket_before_serving(model_dir):
    spec = StageSpec(0, 4, first=True, last=True, dtype="bfloat16", max_seqs=16, max_context=512)
    model = StageModel(model_dir, spec, "cuda")
    want = sorted([BucketKey(rows, 512, False, False) for rows in (1, 2, 4, 8, 16)] +
                  [BucketKey(tokens, 512, False, True) for tokens in TOKEN_BUCKETS])
    assert model.static_steps.warm_up() == want
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 20), device="cuda")
    model.run([0, 5, 9], [0, 0, 0], [20, 7, 11], ids)  # served from graphs captured before: none added
    model.run([0, 5, 9], [20, 7, 11], [1, 1, 1], ids[:, :1])
    assert model.static_steps.captured == want


def test_a_capture_while_serving_survives_another_thread_waiting_on_the_gpu(model_dir):
    """A bucket first used while serving is captured while the stage's gpu-wait thread
    synchronizes on the copies of earlier micro-batches (HostCopy.wait)."""
    spec = StageSpec(0, 4, first=True, last=True, dtype="bfloat16", max_seqs=16, max_context=512)
    model = StageModel(model_dir, spec, "cuda")
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 20), device="cuda")
    model.run([0, 5, 9], [0, 0, 0], [20, 7, 11], ids)
    done = torch.cuda.Event()
    done.record()
    stop, errors, waits = threading.Event(), [], [0]

    def wait_loop():
        try:
            while not stop.is_set():
                done.synchronize()
                waits[0] += 1
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    waiter = threading.Thread(target=wait_loop)
    waiter.start()
    try:
        model.run([0, 5, 9], [20, 7, 11], [1, 1, 1], ids[:, :1])  # captures the 4-row decode graph
    finally:
        stop.set()
        waiter.join()
    assert not errors and waits[0] > 0
    assert BucketKey(4, 512, False, False) in model.static_steps.captured


@pytest.mark.parametrize("precision", ["native", "int4"])
def test_graph_prefill_matches_transformers_layers(model_dir, precision):
    """A prefill micro-batch run as one row per prompt token from a graph (rows sharing slots: K/V
    written before attention), one row continuing an earlier chunk, past several key blocks."""
    spec = StageSpec(0, 4, first=True, last=False, dtype="bfloat16", max_seqs=16, max_context=512,
                     precisions=(precision,) * 4)
    graphs = StageModel(model_dir, spec, "cuda")
    eager = StageModel(model_dir, spec, "cuda", cuda_graphs=False, quanto_kernels=True)  # quanto's matmuls
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 150), device="cuda")
    slots, starts, lengths = [7, 2, 11], [0, 0, 0], [150, 3, 90]
    earlier = eager.run(slots[:1], [0], [70], ids[:1, :70]), graphs.run(slots[:1], [0], [70], ids[:1, :70])
    torch.testing.assert_close(earlier[1].float(), earlier[0].float(), rtol=0.05, atol=0.05)
    starts, lengths = [70, 0, 0], [80, 3, 90]  # 173 tokens: the 192-token bucket
    want = eager.run(slots, starts, lengths, ids[:, :90])
    got = graphs.run(slots, starts, lengths, ids[:, :90])
    assert BucketKey(192, 512, False, True) in graphs.static_steps.captured
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n].float(), want[row, :n].float(), rtol=0.05, atol=0.05)
    for got_k, want_k in zip(graphs.cache.keys, eager.cache.keys):
        torch.testing.assert_close(got_k[:, :, :512], want_k[:, :, :512], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rows", [1, 5, 64, 200, 300, 700])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_matmul_matches_quanto(rows, dtype):
    """Our int8 linear against quanto's module on the same quantized weights: the Triton kernel at
    decode row counts (split along K for the long K), cuBLAS on weights our kernel dequantized past
    DEQUANTIZE_ROWS, with N and K that are not multiples of the tiles (SmolLM2's 576)."""
    from optimum.quanto import freeze, qint8, quantize

    from hetserve.model import weight_only

    torch.manual_seed(0)
    for n, k in ((1536, 576), (4096, 4096), (200, 14336), (17000, 1024)):  # N > 16384: gate|up's tiles
        module = torch.nn.Sequential(torch.nn.Linear(k, n, bias=True, dtype=dtype, device="cuda"))
        quantize(module, weights=qint8)
        freeze(module)
        x = torch.randn(rows, k, dtype=dtype, device="cuda")
        with torch.no_grad():
            want = torch.nn.functional.linear(x, module[0].weight.dequantize(), module[0].bias).float()
            ours = weight_only.from_quanto(module[0])
            got = ours(x).float()
            torch.testing.assert_close(ours.dequantized(), module[0].weight.dequantize(), rtol=0, atol=0)
        assert (got - want).abs().max() <= 0.01 * want.abs().max(), (n, k)


@pytest.mark.parametrize("config", [(16, 64, 128, 1), (16, 128, 256, 2), (64, 64, 64, 4), (64, 128, 128, 1)])
def test_int8_matmul_transposed_tiles_agree(config):
    """The transposed product (SWAP: out^T = w @ x^T) computes what the plain one does, for tiles
    that do not divide N, K or the rows."""
    from hetserve.model.weight_only_kernels import TileConfig, int8_matmul

    torch.manual_seed(0)
    block_m, block_n, block_k, split = config
    weight = torch.randint(-127, 128, (1000, 1500), dtype=torch.int8, device="cuda")
    scale = torch.rand(1000, dtype=torch.bfloat16, device="cuda") / 100
    for rows in (1, 13, 64):
        x = torch.randn(rows, 1500, dtype=torch.bfloat16, device="cuda")
        want = (x.float() @ (weight.float() * scale.float()[:, None]).T)
        got = int8_matmul(x, weight, scale, TileConfig(block_m, block_n, block_k, split, 4, 4, True)).float()
        assert (got - want).abs().max() <= 0.01 * want.abs().max(), rows


@pytest.mark.parametrize("rows", [1, 5, 64, 100, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_matmul_matches_quanto(rows, dtype):
    """Our int4 linear against what quanto dequantizes the same weights to, from each of quanto's
    layouts (tinygemm for bf16, AWQ for fp16, whose kernel fails on Hopper, plain for float32):
    the Triton kernel at decode row counts, cuBLAS on dequantized weights past DEQUANTIZE_ROWS[bits],
    and dequantize + cuBLAS for a group size the kernel does not take (96 for K = 576)."""
    from optimum.quanto import freeze, qint4, quantize

    from hetserve.model import weight_only

    torch.manual_seed(0)
    for n, k in ((1536, 576), (4096, 4096), (200, 14336), (17000, 1024)):  # N > 16384: gate|up's tiles
        module = torch.nn.Sequential(torch.nn.Linear(k, n, bias=True, dtype=dtype, device="cuda"))
        quantize(module, weights=qint4)
        freeze(module)
        quantos = module[0].weight
        plain = quantos if type(quantos).__name__ == "WeightQBitsTensor" else quantos.weight_qbits_tensor()
        weight, bias = plain.dequantize(), module[0].bias.data
        assert weight_only.replace_quanto_linears(module) == 1, type(quantos).__name__
        x = torch.randn(rows, k, dtype=dtype, device="cuda")
        with torch.no_grad():
            got = module(x).float()
            torch.testing.assert_close(module[0].dequantized(), weight, rtol=0, atol=1e-3)
        want = torch.nn.functional.linear(x, weight, bias).float()
        assert (got - want).abs().max() <= 0.01 * want.abs().max(), (n, k, type(quantos).__name__)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernel_dequantizes_every_value_as_dequantize_does(swap, dtype):
    """x = the identity makes each output one weight times 1.0: the kernel's in-register
    dequantization (PTX, two values an instruction) gives every weight as the dequantize kernel
    does, value by value, so no nibble, pair or scale lands on another value's place."""
    from hetserve.model.weight_only import random_linear
    from hetserve.model.weight_only_kernels import TileConfig, dequantize, int4_matmul

    torch.manual_seed(0)
    n, k, group = 320, 512, 128
    linear = random_linear(4, n, k, group, dtype, "cuda")
    weight = dequantize(linear.weight, linear.scale, linear.zero, 4, group, k)
    eye = torch.eye(k, dtype=dtype, device="cuda")
    config = TileConfig(64, 64, group, 1, 4, 4, True) if swap else TileConfig(64, 128, group, 1, 4, 4)
    got = int4_matmul(eye, linear.weight, linear.scale, linear.zero, group, config)
    torch.testing.assert_close(got, weight.T, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_split_products_sum_in_the_kernel_and_reset_their_counters(bits):
    """Products split along K (int8: the long K and 17-64 rows; int4: 1-64 rows where N is not
    gate|up's) sum their partials in the last program of each tile: right at every launch, eagerly and replayed from a CUDA graph, with
    the module's counters back at zero after each (a counter left behind would corrupt the next)."""
    from hetserve.model.weight_only import random_linear
    from hetserve.model.weight_only_kernels import int4_tile_config, tile_config

    torch.manual_seed(0)
    n, k = 8192, 8192  # many tiles finishing in any order
    linear = random_linear(bits, n, k, 128, torch.bfloat16, "cuda")
    weight = linear.dequantized_by_torch()
    for rows in (1, 16, 40):
        config = tile_config(rows, k, n) if bits == 8 else int4_tile_config(rows, k, n, 128)
        assert config.split_k > 1, config
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            for _ in range(2):
                got = linear(x).float()
                assert (got - x.float() @ weight.T).abs().max() <= 0.01 * (x.float() @ weight.T).abs().max()
                assert not linear.counters.any()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = linear(x)
            for _ in range(3):
                x.copy_(torch.randn_like(x))
                graph.replay()
                want = x.float() @ weight.T
                assert (out.float() - want).abs().max() <= 0.01 * want.abs().max(), rows
                assert not linear.counters.any()


@pytest.mark.parametrize("config", [(16, 32, 256, 1, False), (16, 64, 128, 3, False), (64, 64, 128, 2, True),
                                    (64, 128, 256, 1, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_matmul_tiles_agree(config, dtype):
    """Plain and transposed int4 products, several groups a block, splits that do not divide the
    groups, tiles that do not divide N or the rows: all compute x @ (q * scale - zero)^T."""
    from hetserve.model.weight_only_kernels import TileConfig, int4_matmul

    torch.manual_seed(0)
    block_m, block_n, block_k, split, swap = config
    n, k, group = 1000, 1536, 128
    q = torch.randint(0, 16, (n, k // group, group), dtype=torch.uint8, device="cuda")
    packed = (q[..., :group // 2] | (q[..., group // 2:] << 4)).reshape(n, k // 2)
    scale = (torch.rand(n, k // group, device="cuda") / 100).to(dtype)
    zero = (torch.rand(n, k // group, device="cuda") / 10).to(dtype)
    weight = (q.float() * scale.float()[..., None] - zero.float()[..., None]).reshape(n, k)
    for rows in (1, 13, 64):
        x = torch.randn(rows, k, dtype=dtype, device="cuda")
        want = x.float() @ weight.T
        got = int4_matmul(x, packed, scale, zero, group, TileConfig(block_m, block_n, block_k, split, 4, 4, swap))
        assert (got.float() - want).abs().max() <= 0.01 * want.abs().max(), rows


def test_a_device_side_assert_loses_the_device_and_an_out_of_memory_does_not():
    """What a stage's DeviceLost check (stage_loop.device_works) sees on a real GPU; in a process of
    its own, as a device-side assert poisons the process's CUDA context for good."""
    script = """
import torch
from hetserve.worker.stage_loop import DEVICE_ERROR, device_works
dev = torch.device("cuda")
try:
    torch.empty(1 << 50, dtype=torch.uint8, device=dev)
except torch.OutOfMemoryError:
    print("out of memory, works:", device_works(dev))
try:
    torch.zeros(2, device=dev)[torch.tensor([5], device=dev)].cpu()  # index out of bounds
except Exception as exc:
    print("device error:", isinstance(exc, DEVICE_ERROR))
print("after the assert, works:", device_works(dev))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines() == ["out of memory, works: True", "device error: True",
                                        "after the assert, works: False"], done.stderr[-2000:]
