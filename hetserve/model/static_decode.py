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


def batch_bucket(rows: int, max_rows: int) -> int:
    return min([b for b in BATCH_BUCKETS if b >= rows] + [max_rows])


def context_bucket(kv_len: int, max_context: int) -> int:
    return min(max_context, math.ceil(kv_len / CONTEXT_STEP) * CONTEXT_STEP)


class _Bucket:
    """Static buffers of one (batch, context) bucket and, when captured, its graph."""

    def __init__(self, model: "StageModel", rows: int, kv_len: int):
        device = model.device
        self.rows, self.kv_len = rows, kv_len
        self.index = torch.zeros((3, rows), dtype=torch.int64, device=device)  # slots, starts, lengths
        if model.embed is not None:
            self.inputs = torch.zeros((rows, 1), dtype=torch.int64, device=device)  # token ids [b, 1]
        else:
            self.inputs = torch.zeros((rows, 1, model.hidden_size), dtype=model.dtype, device=device)  # [b, 1, H]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def step(self, model: "StageModel") -> torch.Tensor:
        slots, starts, lengths = self.index
        return model.static_decode_step(slots, starts, lengths, self.inputs, self.kv_len)


class StaticDecode:
    """Runs a stage's decode micro-batches at bucketed shapes, from CUDA graphs when `capture`."""

    def __init__(self, model: "StageModel", capture: bool):
        self.model = model
        self.capture = capture
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(rows, context) of every captured graph, for status and logs."""
        return sorted(k for k, b in self.buckets.items() if b.graph is not None)

    def __call__(self, slots: list[int], starts: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """One decode step: inputs [B, 1] ids (stage 0) or [B, 1, H] hidden states.
        Returns hidden states [B, 1, H], or logits [B, V] (float32) on the last stage."""
        rows = len(slots)
        spec = self.model.spec
        key = (batch_bucket(rows, spec.max_seqs), context_bucket(max(starts) + 1, spec.max_context))
        bucket = self.buckets.get(key) or self._new_bucket(*key)
        pad = bucket.rows - rows
        # One host-to-device copy for the three index columns; padding rows: slot 0, length 0.
        index = torch.tensor([slots + [0] * pad, starts + [0] * pad, [1] * rows + [0] * pad], dtype=torch.int64)
        bucket.index.copy_(index, non_blocking=True)
        bucket.inputs[:rows].copy_(inputs)
        if bucket.graph is None:
            return bucket.step(self.model)[:rows]
        bucket.graph.replay()
        return bucket.output[:rows]

    def _new_bucket(self, rows: int, kv_len: int) -> _Bucket:
        bucket = _Bucket(self.model, rows, kv_len)
        self.buckets[(rows, kv_len)] = bucket
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
        log.info("captured a decode graph for %d rows x %d context in %.2f s", rows, kv_len,
                 time.perf_counter() - started)
        return bucket
