"""Runtime micro-batch sizes: the pure controller, and the engine re-sizing from what it measures."""

from __future__ import annotations

from hetserve.config import Limits
import pytest

from hetserve.leader.batching import (MAX_IN_FLIGHT_PER_STAGE, MIN_PREFILL_TOKENS, MIXED_STALL_DECODE_STEPS,
                                      STALL_DECODE_STEPS, Measured, RowFit, choose_sizes)
from hetserve.leader.engine import Engine
from hetserve.wire.messages import StepResult

LIMITS = Limits(max_seqs=64, prefill_tokens=2048, decode_seqs=64)


def test_unmeasured_starts_from_the_limits_one_microbatch_per_stage():
    sizes = choose_sizes(LIMITS, 3, Measured(), decoding=10)
    assert (sizes.prefill_tokens, sizes.max_in_flight) == (2048, 3)


def test_nothing_decoding_prefills_in_whole_chunks():
    measured = Measured((10.0, 10.0), 20.0, prefill_ms_per_token=0.5)
    sizes = choose_sizes(LIMITS, 2, measured, decoding=0)
    assert sizes.regime == "prefill" and sizes.prefill_tokens == 2048


def test_decoding_caps_the_chunk_at_a_few_decode_steps_of_the_slowest_stage():
    measured = Measured((4.0, 10.0), 15.0, prefill_ms_per_token=0.1)
    sizes = choose_sizes(LIMITS, 2, measured, decoding=16)
    assert sizes.regime == "decode" and sizes.prefill_tokens == int(STALL_DECODE_STEPS * 10.0 / 0.1)  # 400
    slow_prefill = Measured((4.0, 10.0), 15.0, prefill_ms_per_token=50.0)
    assert choose_sizes(LIMITS, 2, slow_prefill, decoding=16).prefill_tokens == MIN_PREFILL_TOKENS
    fast_prefill = Measured((4.0, 10.0), 15.0, prefill_ms_per_token=1e-4)
    assert choose_sizes(LIMITS, 2, fast_prefill, decoding=16).prefill_tokens == 2048


def test_mixed_chunks_hold_decoding_up_less_with_the_riding_decode_rows_counted():
    """GPU-like graph prefill (2.3 ms + 0.0326 ms a token) against 5.3 ms decode steps of 64 rows."""
    gpu = Measured((5.3,), 5.4, prefill_ms_per_token=0.04, prefill_fit=fitted(2.3, 0.0326, rows=(256, 1024)))
    apart = choose_sizes(Limits(max_seqs=64, prefill_tokens=1024, decode_seqs=64), 1, gpu, decoding=64)
    mixed = choose_sizes(Limits(max_seqs=64, prefill_tokens=1024, decode_seqs=64), 1, gpu, decoding=64, mixed=True)
    assert apart.regime == "decode" and mixed.regime == "mixed"
    assert apart.prefill_tokens == int((STALL_DECODE_STEPS * 5.3 - 2.3) / 0.0326)  # 579
    assert mixed.prefill_tokens == int((MIXED_STALL_DECODE_STEPS * 5.3 - 2.3) / 0.0326 - 64)  # 190: 64 decode rows ride


def test_a_chunk_stays_large_where_its_fixed_cost_dominates():
    """GPU-like eager prefill: 65 ms fixed + 0.03 ms a token, against 5 ms decode steps. The
    average ms per token at 32-token chunks (~2 ms) would keep chunks at 32; the fit does not."""
    eager_gpu = Measured((5.0,), 12.0, prefill_ms_per_token=2.0, prefill_fit=fitted(65.0, 0.03, rows=(32, 1024)))
    assert choose_sizes(LIMITS, 1, eager_gpu, decoding=16).prefill_tokens == 2048  # break-even 2166 tokens
    # CPU-like: 5 ms fixed + 0.5 ms a token against 30 ms decode steps: the stall budget rules.
    cpu = Measured((30.0,), 40.0, prefill_ms_per_token=0.6, prefill_fit=fitted(5.0, 0.5, rows=(32, 256)))
    want = (STALL_DECODE_STEPS * 30.0 - 5.0) / 0.5  # 230
    assert abs(choose_sizes(LIMITS, 1, cpu, decoding=16).prefill_tokens - want) <= 1


def fitted(fixed: float, per_row: float, rows=(8, 16, 32)) -> RowFit:
    fit = RowFit()
    for _ in range(4):
        for r in rows:
            fit = fit.add(r, fixed + per_row * r)
    return fit


def test_the_fit_recovers_a_line_and_waits_for_spread():
    fixed, per_row = fitted(3.0, 0.5).line()
    assert fixed == pytest.approx(3.0) and per_row == pytest.approx(0.5)
    assert fitted(3.0, 0.5, rows=(16,)).line() is None  # one size only: the slope is unknown


def test_in_flight_rises_only_where_smaller_microbatches_are_cheaper():
    # CPU-like: cost grows with rows; a leader overhead of 30 ms on a 16 ms step is hidden by 2 per stage.
    cpu = Measured((16.0,), 46.0, 0.1, fitted(0.0, 0.5))
    assert choose_sizes(LIMITS, 1, cpu, decoding=32).max_in_flight == MAX_IN_FLIGHT_PER_STAGE
    # GPU-like: a step costs the same at 8 rows as at 32; splitting only multiplies it.
    gpu = Measured((10.0,), 25.0, 0.1, fitted(10.0, 0.0))
    assert choose_sizes(LIMITS, 1, gpu, decoding=32).max_in_flight == 1
    # No overhead to hide: one per stage.
    assert choose_sizes(LIMITS, 2, Measured((8.0, 8.0), 16.0, 0.1, fitted(0.0, 0.5)), decoding=32) \
        .max_in_flight == 2
    # Unknown slope, or fewer decoding requests than stages: one per stage.
    assert choose_sizes(LIMITS, 2, Measured((1.0, 1.0), 100.0, 0.1), decoding=32).max_in_flight == 2
    assert choose_sizes(LIMITS, 2, cpu, decoding=2).max_in_flight == 2
    # The operator's choice stands.
    assert choose_sizes(Limits(max_in_flight=5), 2, cpu, decoding=32).max_in_flight == 5


def test_engine_resizes_prefill_chunks_once_requests_decode():
    """A long prompt arriving while another request decodes is chunked by the measured times."""
    sent = []
    limits = Limits(max_seqs=4, max_context=4096, prefill_tokens=2048, prefill_seqs=4, default_max_tokens=64)
    engine = Engine(limits, {2}, lambda ids: "", lambda step, ids: sent.append(step), vocab_size=100)
    engine.pipeline_ready(1)
    engine.new_request("a", [].append, [5] * 100, 64, 0.0, 0, 1.0, 1, (), True)
    assert sent[-1].phase == "prefill" and sent[-1].lengths == [100]
    engine.on_result(StepResult(sent[-1].mb, [7], [50.0]))  # prefill: 0.5 ms per token
    for _ in range(3):
        engine.on_result(StepResult(sent[-1].mb, [7], [10.0]))  # decode: 10 ms per micro-batch
    assert engine.snapshot()["batching"]["regime"] == "decode"
    engine.new_request("b", [].append, [5] * 1000, 64, 0.0, 0, 1.0, 1, (), True)
    engine.on_result(StepResult(sent[-1].mb, [7], [10.0]))  # the decode in flight comes back
    prefill = next(s for s in reversed(sent) if s.phase == "prefill")
    assert prefill.lengths == [int(STALL_DECODE_STEPS * 10.0 / 0.5)]  # 80 tokens, not 1000
    status = engine.snapshot()["batching"]
    assert status["prefill_tokens"] == 80 and status["prefill_ms_per_token"] == 0.5
