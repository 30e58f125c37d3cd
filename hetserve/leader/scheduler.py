"""Which requests form the next micro-batch: a pure function of the requests' state.

Rules, in order:
- Never more micro-batches in flight than the pipeline holds (one per stage by default), and
  never one request in two micro-batches at once (its next input depends on its last output),
  except with decode-ahead (a one-stage pipeline): there the stage feeds a decode row the token
  its slot sampled last, so a request whose decode row is in flight may follow it with the next
  one, and the pipeline holds twice the micro-batches (one computing, one queued behind it).
- Waiting requests are admitted in arrival order while KV slots are free.
- Prefill and decode rows have their own size limits. A prompt longer than the prefill token
  budget is prefilled in chunks across several micro-batches.
- When both kinds of work are ready and every stage runs a micro-batch's rows at their own
  lengths (`mix_tokens`: GPU stages, one row per token), the decode rows ride in the prefill
  micro-batch (a mixed micro-batch, phase "prefill"): a decode step is bound by reading the
  weights, so prompt tokens in the same step cost little more than their arithmetic. Elsewhere a
  row pads to the longest, so prefill and decode are separate micro-batches that alternate: arriving
  prompts do not stall running decodes and decodes do not starve new prompts.
- A decode micro-batch takes ceil(decoding requests / micro-batches in flight) rows (capped by
  decode_seqs), so that the decoding requests spread over the pipeline's stages and keep every
  stage busy (LLM-PQ's rule: decode micro-batch = global batch / stages). Where more requests
  decode than the micro-batches in flight can carry (more KV slots than decode_seqs x in flight),
  the rows go to those that waited longest since their last row: oldest first would let the
  first admitted decode to the end while the rest hold their slots and wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestView:
    key: int  # unique per request, in arrival order
    has_slot: bool  # admitted: holds a KV slot
    prompt_left: int  # prompt tokens not yet cached
    in_flight: bool  # in a micro-batch that has not come back
    can_follow: bool = False  # decode-ahead: its next decode row may go before that one is back
    last_sent: int = 0  # the micro-batch that last carried a row of it (0: none yet)


@dataclass(frozen=True)
class BatchLimits:
    prefill_seqs: int
    prefill_tokens: int
    decode_seqs: int
    max_in_flight: int
    ahead: bool = False  # decode-ahead: twice max_in_flight may be in flight
    mix_tokens: int = 0  # most tokens of a mixed micro-batch (decode rows + prompt tokens); 0 = never mix


@dataclass(frozen=True)
class Row:
    key: int
    tokens: int  # new tokens this row feeds (prompt chunk, or 1 when decoding)


@dataclass(frozen=True)
class MicroBatch:
    phase: str  # "prefill" | "decode"
    rows: tuple[Row, ...]
    admit: tuple[int, ...]  # keys that must get a KV slot before this batch is sent


def next_microbatch(requests: list[RequestView], free_slots: int, in_flight: int,
                    limits: BatchLimits, last_phase: str | None) -> MicroBatch | None:
    """requests in arrival order; returns None when nothing should be sent now."""
    if in_flight >= limits.max_in_flight * (2 if limits.ahead else 1):
        return None
    decode = _decode(requests, limits)
    if decode and limits.mix_tokens:
        budget = min(limits.prefill_tokens, limits.mix_tokens - len(decode.rows))
        prefill = _prefill(requests, free_slots, limits, budget) if budget > 0 else None
        return MicroBatch("prefill", decode.rows + prefill.rows, prefill.admit) if prefill else decode
    prefill = _prefill(requests, free_slots, limits, limits.prefill_tokens)
    if prefill and decode:
        return decode if last_phase == "prefill" else prefill
    return prefill or decode


def _prefill(requests: list[RequestView], free_slots: int, limits: BatchLimits, budget: int) -> MicroBatch | None:
    rows, admit = [], []
    for r in requests:
        if len(rows) == limits.prefill_seqs or budget == 0:
            break
        if r.in_flight or r.prompt_left == 0:
            continue
        if not r.has_slot:
            if free_slots == 0:
                continue
            free_slots -= 1
            admit.append(r.key)
        take = min(r.prompt_left, budget)
        rows.append(Row(r.key, take))
        budget -= take
    return MicroBatch("prefill", tuple(rows), tuple(admit)) if rows else None


def _decode(requests: list[RequestView], limits: BatchLimits) -> MicroBatch | None:
    decoding = [r for r in requests if r.has_slot and r.prompt_left == 0]
    ready = sorted((r for r in decoding if not r.in_flight or r.can_follow), key=lambda r: r.last_sent)
    if not ready:
        return None
    size = min(limits.decode_seqs, math.ceil(len(decoding) / limits.max_in_flight))
    return MicroBatch("decode", tuple(Row(r.key, 1) for r in ready[:size]), ())
