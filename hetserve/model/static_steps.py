"""Stage steps at fixed shapes, replayed from captured CUDA graphs on a GPU: decode micro-batches,
and prefill micro-batches run as one row per prompt token.

Why: a step of a stage is a few dozen small kernels per layer. Launched one by one from Python
they cost more than the memory traffic they do (transformers' eager decode of a Llama-3-8B shape
runs ~20x off the bandwidth floor on an H200, and its eager prefill step costs ~65 ms whatever
its size). A CUDA graph replays all of a stage's kernels with one launch.

A graph has fixed shapes and fixed buffer addresses, so a step is brought to a bucket:
- rows are padded to a bucket (1, 2, 4, 8, ..., max_seqs for decode; on up to
  MAX_GRAPH_TOKENS for prefill). Padding rows have length 0: they write only the cache's scratch
  column and attend to key 0 alone (StepLayout), so they change nothing;
- inputs are copied into the graph's static buffers before replay, and the output is read from
  its static output buffer after.
A prefill micro-batch (rows of several tokens, [B, T] right-padded) is flattened to one row per
real token, each at its own slot and position: the same one-token step as decode, except that
rows share slots, so every row's K/V is written before any row attends (DecodeLayers). A stage's
decode and prefill thus run the same fused layers, and a prefill step costs its matmuls rather
than its launches. The last stage picks each prompt's last token before the norm and lm_head.

Where attention cannot read the cache in place (CPU; transformers' own layers), attention needs
each row's keys and values side by side: gathering them from the rows' slots copies the K/V the
rows read, so attention spans a context bucket (a multiple of CONTEXT_STEP tokens) and, when the
rows are at least EVERY_SLOT_SHARE of the slots, the step instead runs one row per slot in slot
order (slots without a row are padding) and attends to the cache where it lies. Prefill takes the
graph path only where attention reads the cache in place (a gathered copy per prompt token would
cost more than it saves); elsewhere it runs `StageModel.forward`.

Hosts capture every bucket when they load a stage (`warm_up`), into one memory pool that all of
a stage's graphs share. The same fixed-shape step runs eagerly when capture is off (CPU, or
`--no-cuda-graphs`): tests check it against the dynamic path.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch

from .copies import column, copy_into, to_device

if TYPE_CHECKING:
    from .stage import StageModel

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Prefill buckets, in prompt tokens per step: each is a graph (and ~its activations in the shared
# pool: at 2048 tokens of a Llama-3-8B shape ~0.3 GB). Longer prefill micro-batches run eagerly.
TOKEN_BUCKETS = (2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MAX_GRAPH_TOKENS = TOKEN_BUCKETS[-1]
CONTEXT_STEP = 256  # context buckets: padded attention costs at most this many extra keys per row
# rows / slots from which a step runs every slot instead of gathering K/V. Measured on an H200
# (Llama-3-8B shape, 64 slots, docs/benchmarks.md): at 16 rows bf16 gained (10.9 -> 9.6 ms) but
# quanto's int4 kernel, whose cost grows with rows, lost (15.0 -> 37.4 ms); at 64 rows both gain.
EVERY_SLOT_SHARE = 0.5


class BucketKey(NamedTuple):
    rows: int  # rows of the step (decode: requests; prefill: prompt tokens), padding included
    context: int  # keys attention spans (max_context where it reads the cache in place)
    every_slot: bool  # row i is slot i
    prefill: bool  # rows are prompt tokens, several to a slot


def batch_bucket(rows: int, max_rows: int) -> int:
    return min([b for b in BATCH_BUCKETS if b >= rows] + [max_rows])


def batch_buckets(max_rows: int) -> list[int]:
    """Every bucket a step of 1..max_rows rows can land in."""
    return sorted({batch_bucket(rows, max_rows) for rows in range(1, max_rows + 1)})


def token_bucket(tokens: int) -> int | None:
    """The prefill bucket of a step of `tokens` prompt tokens; None past MAX_GRAPH_TOKENS."""
    return next((b for b in TOKEN_BUCKETS if b >= tokens), None)


def context_bucket(kv_len: int, max_context: int) -> int:
    return min(max_context, math.ceil(kv_len / CONTEXT_STEP) * CONTEXT_STEP)


class _Bucket:
    """Static buffers of one bucket and, when captured, its graph."""

    def __init__(self, model: "StageModel", key: BucketKey):
        device = model.device
        self.key = key
        self.index = torch.zeros((3, key.rows), dtype=torch.int64, device=device)  # slots, starts, lengths
        if model.embed is not None:
            self.inputs = torch.zeros((key.rows, 1), dtype=torch.int64, device=device)  # token ids [b, 1]
        else:
            self.inputs = torch.zeros((key.rows, 1, model.hidden_size), dtype=model.dtype, device=device)  # [b, 1, H]
        # Last stage, prefill: the row of each prompt's last token, the only ones sampled from.
        self.picks = torch.zeros(min(key.rows, model.spec.max_seqs), dtype=torch.int64, device=device) \
            if key.prefill and model.norm is not None else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def step(self, model: "StageModel") -> torch.Tensor:
        slots, starts, lengths = self.index
        return model.static_step(slots, starts, lengths, self.inputs, self.key.context, self.key.every_slot,
                                 shared_slots=self.key.prefill, picks=self.picks)

    def run(self, model: "StageModel") -> torch.Tensor:
        if self.graph is None:
            return self.step(model)
        self.graph.replay()
        return self.output


def _decode_columns(bucket: _Bucket, slots: list[int], starts: list[int]) -> torch.Tensor:
    """[3, bucket rows] int64: slot, start and length of each row of the step; padding rows have
    length 0 (slot 0 when gathering; their own slot when every slot is a row)."""
    rows = bucket.key.rows
    if not bucket.key.every_slot:
        pad = rows - len(slots)
        return torch.tensor([slots + [0] * pad, starts + [0] * pad, [1] * len(slots) + [0] * pad], dtype=torch.int64)
    by_slot_start, by_slot_length = [0] * rows, [0] * rows
    for slot, start in zip(slots, starts):
        by_slot_start[slot], by_slot_length[slot] = start, 1
    return torch.tensor([list(range(rows)), by_slot_start, by_slot_length], dtype=torch.int64)


class StaticSteps:
    """Runs a stage's micro-batches at bucketed shapes, from CUDA graphs when `capture`."""

    def __init__(self, model: "StageModel", capture: bool):
        # The model owns these steps: a strong reference back would make a cycle that keeps a dropped
        # stage (weights, KV cache, graph pools) alive until a full garbage collection, while a host
        # loads its next slice beside it.
        self.model = weakref.proxy(model)
        self.capture = capture
        self.buckets: dict[BucketKey, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        # One side stream for every warm-up before a capture: the caching allocator keeps freed
        # blocks per stream, so a fresh stream per bucket would strand each warm-up's temporaries
        # (int8 prefill: dequantized weights) where no later step can reuse them.
        self._side = torch.cuda.Stream(model.device) if capture else None

    @property
    def captured(self) -> list[BucketKey]:
        """Every captured graph's bucket, for status and logs."""
        return sorted(k for k, b in self.buckets.items() if b.graph is not None)

    @property
    def flat_tokens(self) -> int:
        """Most tokens of a micro-batch that runs one row per token, each row at its own length (any
        mix of prompt chunks and decode rows); 0 where rows pad to the longest (forward())."""
        return MAX_GRAPH_TOKENS if self.capture and self.model.decode_reads_cache_in_place else 0

    def serves_prefill(self, tokens: int) -> bool:
        """Whether a prefill micro-batch of `tokens` prompt tokens runs here (else forward())."""
        return self.model.decode_reads_cache_in_place and token_bucket(tokens) is not None

    def decode(self, slots: list[int], starts: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """One decode step: inputs [B, 1] ids (stage 0) or [B, 1, H] hidden states.
        Returns hidden states [B, 1, H], or logits [B, V] (float32) on the last stage."""
        rows, spec = len(slots), self.model.spec
        # In place there is no gather to avoid by running every slot.
        every_slot = not self.model.decode_reads_cache_in_place and rows >= EVERY_SLOT_SHARE * spec.max_seqs
        bucket = self._bucket(BucketKey(spec.max_seqs if every_slot else batch_bucket(rows, spec.max_seqs),
                                        self._context(max(starts) + 1), every_slot, False))
        copy_into(bucket.index, _decode_columns(bucket, slots, starts))  # one copy to the device
        if every_slot:  # row i of the step is slot i
            where = column(slots, self.model.device)
            bucket.inputs.index_copy_(0, where, inputs)
        else:
            bucket.inputs[:rows].copy_(inputs)
        out = bucket.run(self.model)
        return out.index_select(0, where) if every_slot else out[:rows]

    def prefill(self, slots: list[int], starts: list[int], lengths: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """One prefill micro-batch as one row per prompt token: inputs [B, T] ids (stage 0) or
        [B, T, H] hidden states, rows right-padded to T = max(lengths). Returns hidden states
        [B, T, H] (zeros at padding), or logits [B, V] (float32) at each row's last token."""
        model = self.model
        rows, steps = inputs.shape[:2]
        tokens = sum(lengths)
        size = token_bucket(tokens)
        if size is None:
            raise ValueError(f"a prefill step of {tokens} tokens is past the largest graph ({MAX_GRAPH_TOKENS})")
        bucket = self._bucket(BucketKey(size, self._context(max(s + n for s, n in zip(starts, lengths))), False, True))
        counts = torch.tensor(lengths, dtype=torch.int64)
        row_of = torch.repeat_interleave(torch.arange(rows), counts)  # [tokens]: each token's row
        firsts = torch.cumsum(counts, 0) - counts  # [B]: each row's first token
        offset = torch.arange(tokens) - firsts[row_of]  # [tokens]: each token's place in its row
        pad = size - tokens
        columns = torch.stack([
            torch.nn.functional.pad(torch.tensor(slots)[row_of], (0, pad)),
            torch.nn.functional.pad(torch.tensor(starts)[row_of] + offset, (0, pad)),
            torch.nn.functional.pad(torch.ones(tokens, dtype=torch.int64), (0, pad)),
        ])
        where = row_of * steps + offset  # [tokens]: each token in inputs viewed as [B * T, ...]
        packed = to_device(torch.cat([columns.flatten(), where, firsts + counts - 1]), model.device)
        bucket.index.copy_(packed[:3 * size].view(3, size))
        where = packed[3 * size:3 * size + tokens]
        flat = inputs.reshape(rows * steps, *inputs.shape[2:])
        bucket.inputs[:tokens].copy_(flat.index_select(0, where).unsqueeze(1))
        if bucket.picks is not None:
            bucket.picks[:rows].copy_(packed[3 * size + tokens:])
            return bucket.run(model)[:rows]
        out = bucket.run(model)  # [size, 1, H]
        hidden = out.new_zeros((rows * steps, out.shape[-1]))
        hidden.index_copy_(0, where, out[:tokens, 0])
        return hidden.view(rows, steps, -1)

    def warm_up(self) -> list[BucketKey]:
        """Capture every bucket now, where the bucket is the rows alone (attention reads the cache
        in place): a first use while serving would stall that step by a capture (and, the first
        time a shape is seen, a compile). Every row is padding, so only the cache's scratch
        column is written. -> the buckets captured."""
        spec = self.model.spec
        if not (self.capture and self.model.decode_reads_cache_in_place):
            return []
        for rows in batch_buckets(spec.max_seqs):
            self._bucket(BucketKey(rows, spec.max_context, False, False))
        for tokens in TOKEN_BUCKETS:
            self._bucket(BucketKey(tokens, spec.max_context, False, True))
        return self.captured

    def _context(self, kv_end: int) -> int:
        """Keys a step whose rows reach `kv_end` spans: all of max_context where attention reads
        the cache in place (bounded per row, nothing to pad), else a context bucket."""
        max_context = self.model.spec.max_context
        return max_context if self.model.decode_reads_cache_in_place else context_bucket(kv_end, max_context)

    def _bucket(self, key: BucketKey) -> _Bucket:
        return self.buckets.get(key) or self._new_bucket(key)

    def _new_bucket(self, key: BucketKey) -> _Bucket:
        bucket = _Bucket(self.model, key)
        self.buckets[key] = bucket
        if not self.capture:
            return bucket
        started = time.perf_counter()
        # Warm up on a side stream (lazy initialisations must not land in the graph), then capture.
        self._side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self._side):
            bucket.step(self.model)
        torch.cuda.current_stream(self.model.device).wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a bucket first used while serving is captured while the stage's gpu-wait
        # thread may be synchronizing on an event; the default ("global") mode makes that call an
        # error and invalidates the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            bucket.output = bucket.step(self.model)
        bucket.graph = graph
        log.info("captured a %s graph for %d rows x %d context%s in %.2f s", "prefill" if key.prefill else "decode",
                 key.rows, key.context, " (every slot)" if key.every_slot else "", time.perf_counter() - started)
        return bucket
