"""Weight-only int8 / int4 matmuls on one GPU: ours (model/weight_only.py) against quanto's kernels
(its int8 matmul, tinygemm for int4) and bf16 cuBLAS, per Llama-3-8B projection shape and row
count. "ours" is what a stage runs (the Triton kernel up to DEQUANTIZE_ROWS[bits] rows, cuBLAS on
dequantized weights past it), "kernel" and "dequant" (dequantize + cuBLAS) each path at every row
count; `--sweep` also times a grid of the kernel's tiles (what `tile_config` and
`int4_tile_config` are chosen from).

Each time is one matmul's share of 32 distinct weights of that shape run back to back from a
CUDA graph (as a decode step runs 32 layers): the weights do not fit in L2, so every matmul reads
its weights from memory. Floor: the weights' bytes (scales included) / the measured copy bandwidth.

    python benchmarks/weight_only_sweep.py --rows 1,16,64,128,512,2048 --json out.json
    python benchmarks/weight_only_sweep.py --rows 1,64 --sweep
    python benchmarks/weight_only_sweep.py --bits 8 --rows 16,64 --sweep swap
    python benchmarks/weight_only_sweep.py --bits 4 --rows 1,16,64 --sweep
    python benchmarks/weight_only_sweep.py --bits 8 --rows 128,256,512,1024 --sweep --no-quanto
    python benchmarks/weight_only_sweep.py --rows 16,64 --sweep pipe --no-quanto
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from gpu_decode import copy_bandwidth  # benchmarks/ is on the path of a script run from it
from hetserve.model import weight_only, weight_only_kernels
from hetserve.model.weight_only_kernels import TileConfig

SHAPES = {"q|k|v": (6144, 4096), "o_proj": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32


def graph_us(fns, replays: int = 10) -> float:
    """µs per call of running every fn in `fns` once, from one CUDA graph (median of replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(fns))
    return statistics.median(times)


def quantized(n: int, k: int, bits: int, device: torch.device):
    """LAYERS quanto linears of [n, k] (frozen, bf16) and our twins (int4: repacked from quanto's
    tinygemm layout)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    quanto, ours = [], []
    for _ in range(LAYERS):
        linear = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device))
        quantize(linear, weights=qint8 if bits == 8 else qint4)
        freeze(linear)
        quanto.append(linear[0])
        ours.append(weight_only.from_quanto(linear[0]))
    return quanto, ours


def sweep_configs(rows: int, k: int, which: str, bits: int, chosen: TileConfig) -> list[TileConfig]:
    """Tiles to time: `which` is "all" (plain and transposed), "swap" (the transposed ones only) or
    "pipe" (the chosen tile at 2-8 warps and 2-6 software-pipelined stages, the depth of copies in
    flight a program keeps, which the other sweeps hold at 4 warps and 4 stages; its neighbours in
    column block and split at 4 and 8 warps, 3 and 5 stages). int4 K blocks are whole groups of 128, up to 512 values
    (256 bytes of a weight row)."""
    if which == "pipe":
        near = {chosen._replace(block_n=n) for n in (32, 64, 128, 256) if n != chosen.block_n} \
            | {chosen._replace(split_k=s) for s in (1, 2, 4, 8) if s != chosen.split_k}
        configs = [chosen._replace(warps=w, stages=st) for w in (2, 4, 8) for st in (2, 3, 4, 5, 6)]
        configs += [c._replace(warps=w, stages=st) for c in near for w in (4, 8) for st in (3, 5)]
        return sorted({c for c in configs if c.block_k * c.split_k <= k})
    configs = []
    blocks = (64, 128, 256) if bits == 8 else (128, 256, 512)
    if rows <= 64:
        block_m = max(16, 1 << (rows - 1).bit_length())
        if which == "all":
            grid = itertools.product((32, 64, 128), blocks, (1, 2, 4))
            configs += [TileConfig(block_m, n, kk, s, 4, 4) for n, kk, s in grid]
        # the transposed product: weight rows are the tensor cores' M (64 or 128), the rows their N
        swapped = itertools.product((64, 128), (64, 128, 256) if bits == 8 else (128, 256), (1, 2, 4))
        configs += [TileConfig(block_m, n, kk, s, 4, 4, True) for n, kk, s in swapped]
    elif rows > 64 and which == "all":
        # prefill-sized products: big tiles convert each weight for more rows; split along K for the
        # narrow shapes, whose column blocks alone leave SMs idle; plain and transposed
        grid = itertools.product((64, 128), (64, 128, 256), (64, 128) if bits == 8 else (128, 256), (1, 2),
                                 (False, True))
        configs = [TileConfig(m, n, kk, s, 8 if m * n >= 128 * 128 else 4, 3 if n == 256 else 4, swap)
                   for m, n, kk, s, swap in grid]
    valid = {c for c in configs if c.block_k * c.split_k <= k}
    return sorted(valid)


def kernel(bits: int, x: torch.Tensor, m, config: TileConfig | None = None) -> None:
    if bits == 8:
        weight_only_kernels.int8_matmul(x, m.weight, m.scale, config, m.counters)
    else:
        weight_only_kernels.int4_matmul(x, m.weight, m.scale, m.zero, m.group, config, m.counters)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64,512,2048")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", nargs="?", const="all", choices=["all", "swap", "pipe"], default=None,
                        help="also time a grid of tiles per row (slow: compiles each); swap: the transposed ones only; "
                             "pipe: warps and pipelining depth around the chosen tile")
    parser.add_argument("--no-quanto", dest="quanto", action="store_false",
                        help="skip timing quanto's kernels (tinygemm takes seconds at prefill sizes)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = []
    print(f"{'bits':>4} {'shape':>8} {'rows':>5} {'floor us':>8} {'bf16 us':>8} {'quanto us':>9} {'ours us':>8} "
          f"{'/floor':>6} {'kernel us':>9} {'dequant us':>10} {'best us':>8}  best tiles (chosen tiles)")
    for bits, name in itertools.product([int(b) for b in args.bits.split(",")], args.shapes.split(",")):
        n, k = SHAPES[name]
        quanto, ours = quantized(n, k, bits, device)
        plain = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(LAYERS)]
        weight_bytes = sum(t.numel() * t.element_size() for t in (ours[0].weight, ours[0].scale, ours[0].zero)
                           if t is not None)
        floor = weight_bytes / bandwidth * 1e6
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
            bf16 = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in plain])
            theirs = graph_us([lambda m=m: m(x) for m in quanto]) if args.quanto else float("nan")
            # the kernel, or dequantize + cuBLAS past DEQUANTIZE_ROWS[bits]
            served = graph_us([lambda m=m: m(x) for m in ours])
            chosen = weight_only_kernels.tile_config(rows, k, n) if bits == 8 else \
                weight_only_kernels.int4_tile_config(rows, k, n, ours[0].group)
            timed_kernel = graph_us([lambda m=m: kernel(bits, x, m) for m in ours])
            dequant = graph_us([lambda m=m: torch.nn.functional.linear(x, m.dequantized()) for m in ours])
            timed = {}
            for c in sweep_configs(rows, k, args.sweep, bits, chosen) if args.sweep else []:
                try:
                    timed[c] = graph_us([lambda m=m, c=c: kernel(bits, x, m, c) for m in ours])
                except OutOfResources:  # tiles past the shared memory
                    continue
            best = min(timed, key=timed.get) if timed else chosen
            best_us = timed.get(best, timed_kernel)
            print(f"{bits:>4} {name:>8} {rows:>5} {floor:8.1f} {bf16:8.1f} {theirs:9.1f} {served:8.1f} "
                  f"{served / floor:6.2f} {timed_kernel:9.1f} {dequant:10.1f} {best_us:8.1f}  {tuple(best)} ({tuple(chosen)})",
                  flush=True)
            results.append({"bits": bits, "shape": name, "n": n, "k": k, "rows": rows, "floor_us": floor,
                            "bf16_us": bf16, "quanto_us": theirs, "ours_us": served, "kernel_us": timed_kernel,
                            "dequant_us": dequant, "chosen": list(chosen), "best_us": best_us, "best": list(best),
                            "sweep": [[list(c), t] for c, t in sorted(timed.items(), key=lambda item: item[1])[:8]]})
            if args.json:  # after every row: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"bandwidth_tbs": bandwidth / 1e12, "rows": results}, indent=1) + "\n")
        del quanto, ours, plain
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
