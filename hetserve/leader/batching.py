"""Micro-batch sizes at runtime, from measured stage times: a pure function of what was measured.

The plan (or the operator's limits) gives starting sizes; what pays depends on the devices, the
precisions and the mix of work, so the leader re-sizes from what it measures:

- Decode micro-batches in flight: one per stage keeps every stage busy only if a micro-batch's
  round trip (all stages, the links, the leader's own work) is no longer than the stages' compute.
  With round trip R and the slowest stage's time D per decode micro-batch, the slowest stage
  stays busy with ceil(R / D) micro-batches circulating (each of ceil(decoding / m) rows). More
  than that only makes micro-batches smaller (less weight reuse), so the count is the smallest
  one that hides R, between one per stage and MAX_IN_FLIGHT_PER_STAGE per stage, and never more
  than there are decoding requests.
- Prefill chunk (tokens per prefill micro-batch): a chunk holds up every decode micro-batch
  behind it on each stage. While requests are decoding, a chunk is kept to at most
  STALL_DECODE_STEPS decode micro-batches of the slowest stage's time (steady time per output
  token); with nothing decoding there is nothing to stall, and chunks take the operator's whole
  `prefill_tokens` (prefill throughput). The leader switches between the two regimes as the mix
  of work changes.
Operator limits are upper bounds; an operator's `max_in_flight` is kept as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Limits

MAX_IN_FLIGHT_PER_STAGE = 2  # decode micro-batches per stage at most: hides a round trip twice the compute
STALL_DECODE_STEPS = 4.0  # a prefill chunk may hold decode up for this many decode micro-batch times
MIN_PREFILL_TOKENS = 32  # chunks never get smaller: below this a chunk's fixed costs dominate


@dataclass(frozen=True)
class Measured:
    """Moving averages the engine keeps; 0 = not measured yet."""

    decode_stage_ms: tuple[float, ...] = ()  # per stage, one decode micro-batch
    decode_round_ms: float = 0.0  # send to result of a decode micro-batch, all included
    prefill_ms_per_token: float = 0.0  # the slowest stage's prefill time per prompt token


@dataclass(frozen=True)
class Sizes:
    prefill_tokens: int  # most prompt tokens in the next prefill micro-batch
    max_in_flight: int  # micro-batches in the pipeline at once
    regime: str  # "decode" (chunks sized not to stall decoding) | "prefill" (nothing decoding)


def choose_sizes(limits: Limits, stages: int, measured: Measured, decoding: int) -> Sizes:
    """Sizes for the next micro-batches. decoding: requests past their prompt, holding a slot."""
    in_flight = limits.max_in_flight or _decode_in_flight(stages, measured, decoding)
    slowest = max(measured.decode_stage_ms, default=0.0)
    if decoding == 0:
        return Sizes(limits.prefill_tokens, in_flight, "prefill")
    if slowest <= 0 or measured.prefill_ms_per_token <= 0:
        return Sizes(limits.prefill_tokens, in_flight, "decode")
    fit = int(STALL_DECODE_STEPS * slowest / measured.prefill_ms_per_token)
    return Sizes(max(min(MIN_PREFILL_TOKENS, limits.prefill_tokens), min(limits.prefill_tokens, fit)), in_flight, "decode")


def _decode_in_flight(stages: int, measured: Measured, decoding: int) -> int:
    slowest = max(measured.decode_stage_ms, default=0.0)
    if slowest <= 0 or measured.decode_round_ms <= 0:
        return stages
    hide = math.ceil(measured.decode_round_ms / slowest - 1e-9)
    wanted = min(max(stages, hide), MAX_IN_FLIGHT_PER_STAGE * stages)
    return max(stages, min(wanted, decoding)) if decoding > stages else stages
