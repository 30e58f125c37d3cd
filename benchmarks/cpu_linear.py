"""CPU linears: ms per product of each way model/cpu_linear.py chooses between, for a model's
shapes, and a whole stage's decode step with each way pinned against the measured choice.

    .venv/bin/python benchmarks/cpu_linear.py [--model smollm2-135m] [--rows 1,2,4,8,64,512]
        [--batches 1,2,4,8] [--rounds 2] [--threads T] [--json bench-results/cpu_linear.json]
    .venv/bin/python benchmarks/cpu_linear.py --model-config llama-3-8b --rows 1,2,8,64   # shapes only

--model-config NAME (a built-in config, or a config.json) times that model's product shapes from
random weights and skips the stage table (no weights are loaded).

Products: each shape of the model's decoder layers (q|k|v and gate|up fused, as a decode step
runs them; q, k, v alone, as prefill does) and its lm_head, float32, over distinct weights of at
least 256 MB in all so that they come from memory and not the caches; median of 10 passes.
Stage: one stage holding every layer, the embedding and the head (as `hetserve up --workers 1`),
median ms of a greedy decode step after a 64-token prompt, the ways taking turns for --rounds
rounds so that a drift of this machine's speed hits each alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import PretrainedConfig

from hetserve.model import cpu_linear
from hetserve.model.resolve import resolve_model
from hetserve.model.stage import StageModel, StageSpec, load_config
from hetserve.plan.model_shape import load_model_config

POOL_BYTES = 256 << 20  # distinct weights per shape, in all: far past any CPU cache


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """Product name -> (out, in) features."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {"q|k|v": (q + 2 * kv, hidden), "q_proj": (q, hidden), "k_proj / v_proj": (kv, hidden),
            "o_proj": (hidden, q), "gate|up": (2 * inter, hidden), "down": (hidden, inter),
            "lm_head": (config.vocab_size, hidden)}


def product_ms(way: str, weights: list[torch.Tensor], rows: int) -> float:
    x = torch.randn(rows, weights[0].shape[1])
    fn = cpu_linear.WAYS[way]
    fn(x, weights[0], None)  # first call: oneDNN builds its primitive
    times = []
    for _ in range(10):
        start = time.perf_counter()
        for w in weights:
            fn(x, w, None)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times) * 1000


def stage_decode_ms(stage: StageModel, rows: int, steps: int = 16, prompt: int = 64) -> float:
    slots = list(range(rows))
    vocab = stage.embed.num_embeddings
    stage.run(slots, [0] * rows, [prompt] * rows, torch.randint(0, vocab, (rows, prompt)))
    ids = torch.randint(0, vocab, (rows, 1))
    times = []
    for i in range(steps + 4):
        start = time.perf_counter()
        stage.run(slots, [prompt + i] * rows, [1] * rows, ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times[4:]) * 1000  # the first steps of a row count choose its ways


def stage_table(args, model_dir: Path, config, ways: list[str], results: dict) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    layers = config.num_hidden_layers
    stage = StageModel(model_dir, StageSpec(0, layers, first=True, last=True, max_seqs=max(batches),
                                            max_context=256), "cpu")
    pinned = [*ways, cpu_linear.RULE, None]  # RULE: what a stage serves; None: the choice measured in this process
    samples: dict = {(w, b): [] for w in pinned for b in batches}
    for _ in range(args.rounds):
        for way in pinned:
            cpu_linear.pin(way)
            for b in batches:
                samples[way, b].append(stage_decode_ms(stage, b))
    print(f"\nstage decode step, {layers} layers + head, median ms over {args.rounds} rounds")
    label = {w: w for w in ways} | {cpu_linear.RULE: "rule", None: "measured"}
    print(f"{'batch':>5} " + " ".join(f"{label[w]:>10}" for w in pinned) + f" {'mkl/rule':>9}")
    for b in batches:
        ms = {label[w]: statistics.median(samples[w, b]) for w in pinned}
        results["stage"].append({"batch": b, "ms": ms})
        print(f"{b:>5} " + " ".join(f"{ms[label[w]]:10.2f}" for w in pinned) + f" {ms['mkl'] / ms['rule']:8.2f}x")
    results["choices"] = cpu_linear.choices()
    cpu_linear.pin(cpu_linear.RULE)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (name, directory or .gguf)")
    parser.add_argument("--model-config", default=None,
                        help="time this config's product shapes only (built-in name or config.json), no stage")
    parser.add_argument("--rows", default="1,2,4,8,64,512", help="rows of the product table")
    parser.add_argument("--batches", default="1,2,4,8", help="decode batch sizes of the stage table")
    parser.add_argument("--rounds", type=int, default=2, help="turns each way takes at the stage")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/cpu_linear.json"))
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.model_config:
        name, fields = load_model_config(args.model_config)
        config, model_dir = PretrainedConfig(**fields), None
    else:
        name, model_dir = args.model, resolve_model(args.model).path
        config = load_config(model_dir)
    ways = [w for w in cpu_linear.WAYS if w != "onednn" or torch.backends.mkldnn.is_available()]
    rows = [int(r) for r in args.rows.split(",")]
    results: dict = {"model": name, "threads": threads, "products": [], "stage": []}

    print(f"{name}, CPU with {threads} threads: ms per float32 product (x [rows, in] @ W^T)")
    print(f"{'product':>16} {'out x in':>12} {'rows':>5} " + " ".join(f"{w:>10}" for w in ways) + f" {'mkl/best':>8}")
    for product, (n, k) in layer_shapes(config).items():
        weights = [torch.randn(n, k) for _ in range(max(1, POOL_BYTES // (n * k * 4)))]
        for r in rows:
            ms = {w: product_ms(w, weights, r) for w in ways}
            results["products"].append({"product": product, "out": n, "in": k, "rows": r, "ms": ms})
            print(f"{product:>16} {f'{n}x{k}':>12} {r:>5} " + " ".join(f"{ms[w]:10.3f}" for w in ways)
                  + f" {ms['mkl'] / min(ms.values()):7.2f}x", flush=True)
        del weights
    if model_dir is not None:
        stage_table(args, model_dir, config, ways, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
