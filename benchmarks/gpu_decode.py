"""One stage on one GPU: decode step time against the bandwidth floor, eager vs CUDA graphs, prefill
throughput, and transformers `generate` on the same GPU in the same run.

Columns: "graph" is what a stage serves with (CUDA graphs of the written-out layers, elementwise
kernels fused by torch.compile: model/decode_layers.py), one step timed alone up to its token ids
on the host; "queued" is the same step run back to back, each queued while the one before
computes (how a stage runs with decode-ahead), time per step; "hf-layer graph" replays graphs of
transformers' own decoder layers instead (the previous path); "eager" runs transformers' layers
without graphs; "kernels" counts the GPU kernels of one served decode step. Prefill tokens/s:
"graph" as served (one row per prompt token through the same layers, model/static_steps.py),
"eager" through transformers' layers.

    python benchmarks/random_model.py llama-3-8b /tmp/llama-3-8b --tokenizer
    python benchmarks/gpu_decode.py /tmp/llama-3-8b --json out.json
    python benchmarks/gpu_decode.py /tmp/llama-3-8b --graph-only --kernel-table 12  # where a step's time goes

The stage holds every layer, the embedding and the head (what `hetserve up --workers 1` runs).
Floor: bytes a decode step must read (layers + norm + lm_head, quantized sizes as stored) divided
by the measured device-to-device copy bandwidth (bytes read + written per second). Each decode
row starts after a `--prompt`-token prefill; times are medians over `--steps` steps, greedy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hetserve.model.copies import HostCopy
from hetserve.model.precision import module_bytes
from hetserve.model.stage import StageModel, StageSpec, load_config


def copy_bandwidth(device: torch.device, gib: int = 2) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def longs(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def prefill(model: StageModel, rows: int, prompt: int, chunk_rows: int = 8) -> None:
    device = model.device
    for lo in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - lo)
        ids = torch.randint(0, model.embed.num_embeddings, (n, prompt), device=device)
        model.forward(longs(list(range(lo, lo + n)), device), longs([0] * n, device), longs([prompt] * n, device), ids)


def decode_ms(model: StageModel, rows: int, prompt: int, steps: int, graphs: bool) -> float:
    """Median ms of one greedy decode step of `rows` requests (token ids back on the host)."""
    device = model.device
    prefill(model, rows, prompt)
    slots = list(range(rows))
    ids = torch.randint(0, model.embed.num_embeddings, (rows, 1), device=device)
    times = []
    for i in range(steps + 2):
        starts = [prompt + i] * rows
        if graphs:
            run = lambda: model.decode(slots, starts, ids).tolist()  # noqa: E731
        else:
            run = lambda: model.forward(longs(slots, device), longs(starts, device), longs([1] * rows, device),  # noqa: E731
                                        ids).tolist()
        times.append(timed(run, device))
    return statistics.median(times[2:])  # the first steps capture graphs


def queued_decode_ms(model: StageModel, rows: int, prompt: int, steps: int) -> float:
    """ms per step of `steps` greedy decode steps queued back to back, each copying its token ids
    back (model/copies.py), with one wait at the end: how a stage runs them with decode-ahead,
    where the next step is queued while one computes (worker/stage_loop.py)."""
    device = model.device
    prefill(model, rows, prompt)
    slots = list(range(rows))
    ids = torch.randint(0, model.embed.num_embeddings, (rows, 1), device=device)
    model.decode(slots, [prompt] * rows, ids).tolist()  # the bucket's graph exists from decode_ms
    start = time.perf_counter()
    copies = [HostCopy(model.decode(slots, [prompt + 1 + i] * rows, ids)) for i in range(steps)]
    copies[-1].wait()
    return (time.perf_counter() - start) * 1000 / steps


def kernel_times(model: StageModel, rows: int, start: int) -> dict[str, tuple[int, float]]:
    """GPU kernels of one served decode step of `rows` rows (graph replays are traced kernel by
    kernel): kernel name -> (launches, total µs). Copies are left out."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.zeros((rows, 1), dtype=torch.int64, device=model.device)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        model.decode(list(range(rows)), [start] * rows, ids).tolist()
        torch.cuda.synchronize(model.device)
    kernels: dict[str, tuple[int, float]] = {}
    for e in trace.events():
        if e.device_type.name == "CUDA" and "Memcpy" not in e.name and "Memset" not in e.name:
            count, us = kernels.get(e.name, (0, 0.0))
            kernels[e.name] = (count + 1, us + e.device_time)
    return kernels


def print_kernel_table(precision: str, rows: int, kernels: dict[str, tuple[int, float]], top: int) -> None:
    """Where one decode step's GPU time goes: the `top` kernels by total time."""
    total = sum(us for _, us in kernels.values())
    print(f"{precision} batch {rows}: {sum(n for n, _ in kernels.values())} kernels, {total / 1000:.2f} ms of GPU "
          f"time in kernels", flush=True)
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / 1000:7.3f} ms {us / total:6.1%} {count:5d}x  {name[:110]}", flush=True)


def prefill_tokens_per_s(model: StageModel, length: int, graphs: bool) -> float:
    """One prompt of `length` tokens: as served (a graph of one row per token, up to
    MAX_GRAPH_TOKENS) or eagerly through transformers' layers (forward)."""
    device = model.device
    ids = torch.randint(0, model.embed.num_embeddings, (1, length), device=device)
    if graphs:
        run = lambda: model.run([0], [0], [length], ids)  # noqa: E731
    else:
        run = lambda: model.forward(longs([0], device), longs([0], device), longs([length], device), ids)  # noqa: E731
    run()
    return length / (statistics.median(timed(run, device) for _ in range(3)) / 1000)


def hf_step_ms(model_dir: Path, batches: list[int], prompt: int, device: torch.device) -> dict[int, float]:
    """transformers eager generate: ms per decoding step, (t(65 tokens) - t(1 token)) / 64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    out = {}
    for b in batches:
        ids = torch.randint(0, model.config.vocab_size, (b, prompt), device=device)

        def gen(n):
            return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False)
        gen(4)()
        out[b] = (timed(gen(65), device) - timed(gen(1), device)) / 64
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--precisions", default="native,int8,int4",
                        help="comma-separated; PRECISION:quanto runs int8 / int4 with quanto's matmuls instead of ours")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill", default="512,2048")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kernel-table", type=int, default=0, metavar="N",
                        help="also print each decode step's N costliest kernels")
    parser.add_argument("--graph-only", action="store_true",
                        help="time only the served path: no transformers generate, hf-layer graph or eager columns")
    args = parser.parse_args()
    device = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.prefill.split(",") if n]
    layers = load_config(args.model_dir).num_hidden_layers
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    results = {"bandwidth_tbs": bandwidth / 1e12, "prompt": args.prompt, "rows": []}
    hf = {} if args.graph_only else hf_step_ms(args.model_dir, batches, args.prompt, device)
    torch.cuda.empty_cache()  # transformers' copy of the weights is gone with hf_step_ms's frame
    print(f"transformers generate ms/step: {hf}", flush=True)
    print(f"{'precision':>11} {'batch':>5} {'floor ms':>8} {'graph ms':>8} {'/floor':>6} {'queued ms':>9} {'/floor':>6} "
          f"{'kernels':>7} "
          f"{'hf-layer graph ms':>17} {'eager ms':>8} {'graph tok/s':>11} {'vs hf':>6}")
    for precision in args.precisions.split(","):
        name, _, backend = precision.partition(":")  # "int8:quanto": quanto's matmuls, a baseline
        spec = StageSpec(0, layers, first=True, last=True, dtype="bfloat16", max_seqs=max(batches),
                         max_context=max(lengths + [args.prompt + args.steps + 8]),
                         precisions=tuple([name] * layers))
        model = StageModel(args.model_dir, spec, "cuda", cuda_graphs=True, quanto_kernels=backend == "quanto")
        read = module_bytes(model.layers) + module_bytes(model.norm) + module_bytes(model.lm_head)
        floor = read / bandwidth * 1000
        paths = ("graph",) if args.graph_only else ("graph", "eager")
        prefill_rates = {f"{path} {n}": round(prefill_tokens_per_s(model, n, path == "graph"))
                         for n in lengths for path in paths}
        started = time.perf_counter()
        graph = {b: decode_ms(model, b, args.prompt, args.steps, graphs=True) for b in batches}
        queued = {b: queued_decode_ms(model, b, args.prompt, args.steps) for b in batches}
        profiles = {b: kernel_times(model, b, args.prompt + args.steps + 2) for b in batches}
        kernels = {b: sum(n for n, _ in profiles[b].values()) for b in batches}
        print(f"{precision:>11} graphs {model.static_steps.captured}, captured and timed in "
              f"{time.perf_counter() - started:.0f} s (includes torch.compile)", flush=True)
        for b in batches if args.kernel_table else ():
            print_kernel_table(precision, b, profiles[b], args.kernel_table)
        nan = float("nan")
        if not args.graph_only:
            model.use_transformers_layers()  # the same stage, graphs over transformers' own layers
        hf_layers = {b: nan if args.graph_only else decode_ms(model, b, args.prompt, args.steps, graphs=True)
                     for b in batches}
        for b in batches:
            eager = nan if args.graph_only else decode_ms(model, b, args.prompt, args.steps, graphs=False)
            row = {"precision": precision, "batch": b, "weight_gb": read / 1e9, "floor_ms": floor,
                   "graph_ms": graph[b], "queued_ms": queued[b], "kernels": kernels[b], "hf_layer_graph_ms": hf_layers[b],
                   "eager_ms": eager, "hf_ms": hf.get(b) if precision == "native" else None,
                   "prefill_tokens_per_s": prefill_rates}
            results["rows"].append(row)
            vs_hf = f"{hf[b] / graph[b]:6.1f}" if precision == "native" and b in hf else f"{'':>6}"
            print(f"{precision:>11} {b:>5} {floor:8.2f} {graph[b]:8.2f} {graph[b] / floor:6.2f} {queued[b]:9.2f} "
                  f"{queued[b] / floor:6.2f} {kernels[b]:7d} "
                  f"{hf_layers[b]:17.2f} {eager:8.2f} {b / graph[b] * 1000:11.0f} {vs_hf}", flush=True)
        print(f"{precision:>11} prefill tokens/s (batch 1): {prefill_rates}", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
