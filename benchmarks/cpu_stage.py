"""One stage on this CPU: decode step time against the memory-bandwidth floor and against
transformers `generate` at the same precision, and prefill tokens/s, for fp32, W8A16 and W4A16.

The CPU half of issue 4's table (benchmarks/gpu_decode.py is the GPU half). The stage holds every
layer, the embedding and the head, as `hetserve up --workers 1` runs it, and is timed by the call
a CPU host serves with (StageModel.run: transformers' decoder layers over the slot KV cache;
graphs and our kernels are GPU-only). int8 and int4 are quanto's weight-only layers, in the stage
and in transformers alike (model/precision.py).

    .venv/bin/python benchmarks/cpu_stage.py [--model smollm2-135m] [--batches 1,8] [--prefill 512,2048]
        [--precisions native,int8,int4] [--threads T] [--json bench-results/cpu_stage.json]

Floor: bytes a decode step must read (layers + norm + lm_head, quantized sizes as stored) over the
best copy bandwidth measured on this CPU (bytes read + written per second, same threads). Decode rows
start after a --prompt-token prefill; times are medians. transformers: (time of generate for
1 + n tokens - time for 1) / n, greedy, batch of equal-length random prompts; prefill: generate
of one token from one prompt (prefill and sampling one token, what a stage's prefill does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hetserve.model.precision import apply_precisions, module_bytes
from hetserve.model.resolve import resolve_model
from hetserve.model.stage import StageModel, StageSpec, load_config


def copy_bandwidth(mib: int = 1024) -> float:
    """Bytes read + written per second by a copy between two buffers far larger than the caches: the
    best of 10 (a shared machine's neighbours only ever slow it down)."""
    src = torch.ones(mib << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / min(times)


def median_ms(fn, repeats: int) -> float:
    fn()  # the first call pays one-off costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def random_ids(vocab: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length))


def stage_decode_ms(model: StageModel, rows: int, prompt: int, steps: int) -> float:
    """Median ms of one greedy decode step of `rows` requests, each after a `prompt`-token prefill."""
    vocab = model.embed.num_embeddings
    slots = list(range(rows))
    model.run(slots, [0] * rows, [prompt] * rows, random_ids(vocab, rows, prompt))
    ids = random_ids(vocab, rows, 1)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        ids = model.run(slots, [prompt + i] * rows, [1] * rows, ids).view(rows, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def stage_prefill_tokens_per_s(model: StageModel, length: int, repeats: int) -> float:
    ids = random_ids(model.embed.num_embeddings, 1, length)
    return length / median_ms(lambda: model.run([0], [0], [length], ids), repeats) * 1000


class Transformers:
    """transformers' model at one precision: decode ms per step and prefill tokens/s by `generate`."""

    def __init__(self, model_dir: Path, precision: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if precision != "native":
            layers = self.model.model.layers
            apply_precisions(layers, [precision] * len(layers), torch.device("cpu"))
        self.vocab = self.model.config.vocab_size

    @torch.no_grad()
    def _generate_ms(self, ids: torch.Tensor, tokens: int, repeats: int) -> float:
        return median_ms(lambda: self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                                     min_new_tokens=tokens, do_sample=False), repeats)

    def decode_ms(self, rows: int, prompt: int, steps: int) -> float:
        ids = random_ids(self.vocab, rows, prompt)
        return (self._generate_ms(ids, 1 + steps, 3) - self._generate_ms(ids, 1, 3)) / steps

    def prefill_tokens_per_s(self, length: int, repeats: int) -> float:
        return length / self._generate_ms(random_ids(self.vocab, 1, length), 1, repeats) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (name, directory or .gguf)")
    parser.add_argument("--precisions", default="native,int8,int4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before the timed decode steps")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed (median)")
    parser.add_argument("--prefill", default="512,2048", help="prompt lengths of the prefill columns")
    parser.add_argument("--repeats", type=int, default=3, help="prefill runs per length (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/cpu_stage.json"))
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model_dir = resolve_model(args.model).path
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.prefill.split(",") if n]
    layers = load_config(model_dir).num_hidden_layers
    bandwidth = copy_bandwidth()
    print(f"{args.model}, CPU with {threads} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)",
          flush=True)
    print(f"{'precision':>9} {'batch':>5} {'weights MB':>10} {'floor ms':>8} {'stage ms':>8} {'/floor':>6} "
          f"{'hf ms':>7} {'hf/stage':>8}", flush=True)
    results = {"model": args.model, "threads": threads, "bandwidth_gbs": bandwidth / 1e9, "rows": [], "prefill": []}
    for precision in args.precisions.split(","):
        spec = StageSpec(0, layers, first=True, last=True, dtype="float32", max_seqs=max(batches + [1]),
                         max_context=max(lengths + [args.prompt + args.steps + 2]),
                         precisions=tuple([precision] * layers))
        stage = StageModel(model_dir, spec, "cpu")
        read = module_bytes(stage.layers) + module_bytes(stage.norm) + module_bytes(stage.lm_head)
        floor = read / bandwidth * 1000
        decode = {b: stage_decode_ms(stage, b, args.prompt, args.steps) for b in batches}
        prefill = {n: stage_prefill_tokens_per_s(stage, n, args.repeats) for n in lengths}
        del stage
        hf = Transformers(model_dir, precision)
        hf_decode = {b: hf.decode_ms(b, args.prompt, args.steps) for b in batches}
        hf_prefill = {n: hf.prefill_tokens_per_s(n, args.repeats) for n in lengths}
        del hf
        for b in batches:
            results["rows"].append({"precision": precision, "batch": b, "weight_mb": read / 1e6, "floor_ms": floor,
                                    "stage_ms": decode[b], "hf_ms": hf_decode[b]})
            print(f"{precision:>9} {b:>5} {read / 1e6:10.1f} {floor:8.2f} {decode[b]:8.2f} {decode[b] / floor:6.2f} "
                  f"{hf_decode[b]:7.2f} {hf_decode[b] / decode[b]:7.2f}x", flush=True)
        for n in lengths:
            results["prefill"].append({"precision": precision, "length": n, "stage_tokens_per_s": prefill[n],
                                       "hf_tokens_per_s": hf_prefill[n]})
            print(f"{precision:>9} prefill {n} tokens: stage {prefill[n]:.0f} tok/s, transformers "
                  f"{hf_prefill[n]:.0f} tok/s ({prefill[n] / hf_prefill[n]:.2f}x)", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
