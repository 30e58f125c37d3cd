"""Decode steps at fixed shapes, replayed from captured CUDA graphs on a GPU.

Why: a decode step of a stage is a few dozen small kernels per layer. Launched one by one from
Python they cost more than the memory traffic they do (transformers' eager decode of a
Llama-3-8B shape runs ~20x off the bandwidth floor on an H200). A CUDA graph replays all of a
stage's kernels with one launch.

A graph has fixed shapes and fixed buffer addresses, so a step is brought to a bucket:
- rows are padded to a batch bucket (1, 2, 4, 8, ..., max_seqs). Padding rows have length 0:
  they write only the cache's scratch column and attend to key 0 alone (StepLayout), so they
  change nothing;
- attention spans a context bucket (a multiple of CONTEXT_STEP tokens, at most max_context)
  rather than the batch's own longest context; the mask hides the rest;
- inputs are copied into the graph's static buffers before replay, and the output is read from
  its static output buffer after.
Attention needs each row's keys and values side by side: gathering them from the rows' slots is
a copy of the K/V the rows read (at 64 rows x 256 context, a quarter of a Llama-3-8B decode
step on an H200). When the rows are at least EVERY_SLOT_SHARE of the slots, the step instead runs
one row per slot, in slot order (slots without a row of this micro-batch are padding), and
attends to the cache where it lies: the extra rows cost little in matmuls that are bound by
reading the weights.
Graphs are captured on a bucket's first use (a one-off cost of one eager step plus the capture)
into one memory pool that all of a stage's graphs share. The same fixed-shape step runs eagerly
when capture is off (CPU, or `--no-cuda-graphs`): tests check it against the dynamic path.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .stage import StageModel

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CONTEXT_STEP = 256  # context buckets: padded attention costs at most this many extra keys per row
# rows / slots from which a step runs every slot instead of gathering K/V. Measured on an H200
# (Llama-3-8B shape, 64 slots, docs/benchmarks.md): at 16 rows bf16 gained (10.9 -> 9.6 ms) but
# quanto's int4 kernel, whose cost grows with rows, lost (15.0 -> 37.4 ms); at 64 rows both gain.
EVERY_SLOT_SHARE = 0.5


def batch_bucket(rows: int, max_rows: int) -> int:
    return min([b for b in BATCH_BUCKETS if b >= rows] + [max_rows])


def batch_buckets(max_rows: int) -> list[int]:
    """Every bucket a step of 1..max_rows rows can land in."""
    return sorted({batch_bucket(rows, max_rows) for rows in range(1, max_rows + 1)})


def context_bucket(kv_len: int, max_context: int) -> int:
    return min(max_context, math.ceil(kv_len / CONTEXT_STEP) * CONTEXT_STEP)


class _Bucket:
    """Static buffers of one (batch, context) bucket and, when captured, its graph."""

    def __init__(self, model: "StageModel", rows: int, kv_len: int, every_slot: bool):
        device = model.device
        self.rows, self.kv_len, self.every_slot = rows, kv_len, every_slot
        self.index = torch.zeros((3, rows), dtype=torch.int64, device=device)  # slots, starts, lengths
        if model.embed is not None:
            self.inputs = torch.zeros((rows, 1), dtype=torch.int64, device=device)  # token ids [b, 1]
        else:
            self.inputs = torch.zeros((rows, 1, model.hidden_size), dtype=model.dtype, device=device)  # [b, 1, H]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def step(self, model: "StageModel") -> torch.Tensor:
        slots, starts, lengths = self.index
        return model.static_decode_step(slots, starts, lengths, self.inputs, self.kv_len, self.every_slot)


def _index_columns(bucket: _Bucket, slots: list[int], starts: list[int]) -> torch.Tensor:
    """[3, bucket rows] int64: slot, start and length of each row of the step; padding rows have
    length 0 (slot 0 when gathering; their own slot when every slot is a row)."""
    if not bucket.every_slot:
        pad = bucket.rows - len(slots)
        return torch.tensor([slots + [0] * pad, starts + [0] * pad, [1] * len(slots) + [0] * pad], dtype=torch.int64)
    by_slot_start, by_slot_length = [0] * bucket.rows, [0] * bucket.rows
    for slot, start in zip(slots, starts):
        by_slot_start[slot], by_slot_length[slot] = start, 1
    return torch.tensor([list(range(bucket.rows)), by_slot_start, by_slot_length], dtype=torch.int64)


class StaticDecode:
    """Runs a stage's decode micro-batches at bucketed shapes, from CUDA graphs when `capture`."""

    def __init__(self, model: "StageModel", capture: bool):
        self.model = model
        self.capture = capture
        self.buckets: dict[tuple[int, int, bool], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def captured(self) -> list[tuple[int, int, bool]]:
        """(rows, context, every slot) of every captured graph, for status and logs."""
        return sorted(k for k, b in self.buckets.items() if b.graph is not None)

    def __call__(self, slots: list[int], starts: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """One decode step: inputs [B, 1] ids (stage 0) or [B, 1, H] hidden states.
        Returns hidden states [B, 1, H], or logits [B, V] (float32) on the last stage."""
        rows, spec = len(slots), self.model.spec
        if self.model.decode_reads_cache_in_place:  # neither a gather to avoid nor a context to pad
            kv_len, every_slot = spec.max_context, False
        else:
            kv_len = context_bucket(max(starts) + 1, spec.max_context)
            every_slot = rows >= EVERY_SLOT_SHARE * spec.max_seqs
        bucket = self._bucket(spec.max_seqs if every_slot else batch_bucket(rows, spec.max_seqs), kv_len, every_slot)
        bucket.index.copy_(_index_columns(bucket, slots, starts), non_blocking=True)  # one host-to-device copy
        if every_slot:  # row i of the step is slot i
            where = torch.tensor(slots, dtype=torch.int64).to(self.model.device)
            bucket.inputs.index_copy_(0, where, inputs)
        else:
            bucket.inputs[:rows].copy_(inputs)
        if bucket.graph is None:
            out = bucket.step(self.model)
        else:
            bucket.graph.replay()
            out = bucket.output
        return out.index_select(0, where) if every_slot else out[:rows]

    def warm_up(self) -> list[tuple[int, int, bool]]:
        """Capture every batch bucket now, where the bucket is the rows alone (attention reads the
        cache in place): a first use while serving would stall that step by a capture (and, the
        first time a shape is seen, a compile). Every row is padding, so only the cache's scratch
        column is written. -> the buckets captured."""
        spec = self.model.spec
        if not (self.capture and self.model.decode_reads_cache_in_place):
            return []
        for rows in batch_buckets(spec.max_seqs):
            self._bucket(rows, spec.max_context, False)
        return self.captured

    def _bucket(self, rows: int, kv_len: int, every_slot: bool) -> _Bucket:
        return self.buckets.get((rows, kv_len, every_slot)) or self._new_bucket(rows, kv_len, every_slot)

    def _new_bucket(self, rows: int, kv_len: int, every_slot: bool) -> _Bucket:
        bucket = _Bucket(self.model, rows, kv_len, every_slot)
        self.buckets[(rows, kv_len, every_slot)] = bucket
        if not self.capture:
            return bucket
        started = time.perf_counter()
        # Warm up on a side stream (lazy initialisations must not land in the graph), then capture.
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            bucket.step(self.model)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.output = bucket.step(self.model)
        bucket.graph = graph
        log.info("captured a decode graph for %d rows x %d context%s in %.2f s", rows, kv_len,
                 " (every slot)" if every_slot else "", time.perf_counter() - started)
        return bucket
