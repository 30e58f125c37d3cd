"""Micro-batch sizes at runtime, from measured stage times: a pure function of what was measured.

The plan (or the operator's limits) gives starting sizes; what pays depends on the devices, the
precisions and the mix of work, so the leader re-sizes from what it measures:

- Decode micro-batches in flight: one per stage keeps every stage busy when a micro-batch's round
  trip is all compute. What the round trip adds beyond the stages' compute (the leader's own work
  per micro-batch, the links) leaves stages idle; more, smaller micro-batches in flight hide it,
  but only where a smaller micro-batch is also cheaper. On a GPU a decode step costs about the
  same at 8 rows as at 64 (it is bound by reading the weights), so splitting the batch there only
  multiplies the work; on a CPU the cost grows with the rows, so splitting hides the overhead.
  The engine fits the slowest stage's decode time to its rows (decode_ms = fixed + per_row x
  rows, from the micro-batches it has seen) and the count is the one, between one and
  MAX_IN_FLIGHT_PER_STAGE per stage, with the highest predicted rate:
      rate(m) = decoding / max(round trip at b rows, m x slowest stage at b rows), b = decoding / m.
  Without a fit (all micro-batches the same size so far) the count stays at one per stage.
- Prefill chunk (tokens per prefill micro-batch): a chunk holds up every decode micro-batch
  behind it on each stage. While requests are decoding, a chunk is kept to at most
  STALL_DECODE_STEPS decode micro-batches of the slowest stage's time (steady time per output
  token); with nothing decoding there is nothing to stall, and chunks take the operator's whole
  `prefill_tokens` (prefill throughput). The leader switches between the two regimes as the mix
  of work changes. Where decode rows ride in the prefill micro-batch (mixed micro-batches,
  scheduler.py) every prompt token shares a decode step's weight reads, so chunks are kept
  smaller, to MIXED_STALL_DECODE_STEPS decode times with the step's decode rows counted in: the
  decode rows are slowed less and prompts still start at a multiple of the rate they arrive at
  while anything decodes. A chunk's time is fitted as fixed + per_token x tokens (the same decayed fit),
  and a chunk is never made smaller than fixed / per_token tokens, where its fixed part is half
  its time: below that a smaller chunk hardly shortens the stall but multiplies the fixed cost.
  (Measured on an H200: an eager prefill step costs ~65 ms whatever its size, 0.03 ms a token;
  chunks sized from the average ms per token alone shrank to 32 tokens and took 16 s to prefill
  64 prompts of 128 tokens, docs/benchmarks.md.) Until the fit has two sizes to go by, the
  average ms per token stands in.
Operator limits are upper bounds; an operator's `max_in_flight` is kept as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Limits

MAX_IN_FLIGHT_PER_STAGE = 2  # decode micro-batches per stage at most: hides a round trip twice the compute
STALL_DECODE_STEPS = 4.0  # a prefill chunk may hold decode up for this many decode micro-batch times
MIXED_STALL_DECODE_STEPS = 2.0  # a mixed micro-batch (decode rows + a chunk) may take this many decode micro-batch times
MIN_PREFILL_TOKENS = 32  # chunks never get smaller: below this a chunk's fixed costs dominate
FIT_DECAY = 0.95  # weight of the past in a cost fit per micro-batch: about the last 20 count
MIN_ROWS_SPREAD = 1.0  # standard deviation of the sizes (rows or tokens) before a fit's slope is trusted


@dataclass(frozen=True)
class RowFit:
    """Decayed least-squares sums of (size, slowest stage ms) over micro-batches: the engine keeps
    one with rows of decode micro-batches, one with tokens of prefill ones."""

    n: float = 0.0
    rows: float = 0.0
    rows2: float = 0.0
    ms: float = 0.0
    rows_ms: float = 0.0

    def add(self, rows: int, ms: float) -> "RowFit":
        d = FIT_DECAY
        return RowFit(d * self.n + 1, d * self.rows + rows, d * self.rows2 + rows * rows, d * self.ms + ms,
                      d * self.rows_ms + rows * ms)

    def line(self) -> tuple[float, float] | None:
        """(fixed ms, ms per row or token), or None while the sizes have not varied enough to tell."""
        if self.n < 2:
            return None
        mean_rows, mean_ms = self.rows / self.n, self.ms / self.n
        var = self.rows2 / self.n - mean_rows ** 2
        if var < MIN_ROWS_SPREAD ** 2:
            return None
        slope = max(0.0, (self.rows_ms / self.n - mean_rows * mean_ms) / var)
        return max(0.0, mean_ms - slope * mean_rows), slope


@dataclass(frozen=True)
class Measured:
    """Moving averages the engine keeps; 0 = not measured yet."""

    decode_stage_ms: tuple[float, ...] = ()  # per stage, one decode micro-batch
    decode_round_ms: float = 0.0  # send to result of a decode micro-batch, all included
    prefill_ms_per_token: float = 0.0  # the slowest stage's prefill time per prompt token
    decode_fit: RowFit = RowFit()  # the slowest stage's decode ms against rows
    prefill_fit: RowFit = RowFit()  # the slowest stage's prefill ms against tokens


@dataclass(frozen=True)
class Sizes:
    prefill_tokens: int  # most prompt tokens in the next prefill micro-batch
    max_in_flight: int  # micro-batches in the pipeline at once
    regime: str  # "decode" (chunks sized not to stall decoding) | "mixed" (the same, decode rows riding
    #              in the chunks' micro-batches) | "prefill" (nothing decoding)


def choose_sizes(limits: Limits, stages: int, measured: Measured, decoding: int, mixed: bool = False) -> Sizes:
    """Sizes for the next micro-batches. decoding: requests past their prompt, holding a slot;
    mixed: decode rows ride in prefill micro-batches."""
    in_flight = limits.max_in_flight or _decode_in_flight(stages, measured, decoding)
    slowest = max(measured.decode_stage_ms, default=0.0)
    if decoding == 0:
        return Sizes(limits.prefill_tokens, in_flight, "prefill")
    regime = "mixed" if mixed else "decode"
    if slowest <= 0 or measured.prefill_ms_per_token <= 0:
        return Sizes(limits.prefill_tokens, in_flight, regime)
    budget = (MIXED_STALL_DECODE_STEPS if mixed else STALL_DECODE_STEPS) * slowest  # ms a chunk may hold decoding up
    riders = min(limits.decode_seqs, math.ceil(decoding / in_flight)) if mixed else 0  # decode rows in its step
    line = measured.prefill_fit.line()
    if line is None:
        tokens = budget / measured.prefill_ms_per_token - riders
    elif line[1] <= 0:  # no cost per token to save: the whole chunk
        tokens = limits.prefill_tokens
    else:
        fixed, per_token = line
        tokens = max((budget - fixed) / per_token - riders, fixed / per_token)
    return Sizes(max(min(MIN_PREFILL_TOKENS, limits.prefill_tokens), min(limits.prefill_tokens, int(tokens))),
                 in_flight, regime)


def _decode_in_flight(stages: int, measured: Measured, decoding: int) -> int:
    line = measured.decode_fit.line()
    slowest = max(measured.decode_stage_ms, default=0.0)
    if line is None or slowest <= 0 or measured.decode_round_ms <= 0 or decoding <= stages:
        return stages
    fixed, per_row = line
    # What the round trip holds beyond the stages' compute: the leader and the links.
    overhead = max(0.0, measured.decode_round_ms - sum(measured.decode_stage_ms))
    scale_all = sum(measured.decode_stage_ms) / slowest  # all stages' time relative to the slowest's

    def rate(m: int) -> float:
        slow = fixed + per_row * math.ceil(decoding / m)
        return decoding / max(slow * scale_all + overhead, m * slow)

    counts = range(stages, min(MAX_IN_FLIGHT_PER_STAGE * stages, decoding) + 1)
    return max(counts, key=lambda m: (rate(m) * (1 - 1e-9 * m)))  # ties: fewer, larger micro-batches
