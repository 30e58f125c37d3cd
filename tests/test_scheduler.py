"""The pure micro-batch scheduler."""

from __future__ import annotations

from hetserve.leader.scheduler import BatchLimits, RequestView, next_microbatch

LIMITS = BatchLimits(prefill_seqs=2, prefill_tokens=100, decode_seqs=8, max_in_flight=2)


def view(key, has_slot=True, prompt_left=0, in_flight=False):
    return RequestView(key, has_slot, prompt_left, in_flight)


def test_nothing_when_pipeline_full_or_idle():
    assert next_microbatch([view(1)], 4, in_flight=2, limits=LIMITS, last_phase=None) is None
    assert next_microbatch([], 4, 0, LIMITS, None) is None
    assert next_microbatch([view(1, in_flight=True)], 4, 1, LIMITS, None) is None


def test_admits_in_arrival_order_while_slots_last():
    reqs = [view(1, False, 10), view(2, False, 10), view(3, False, 10)]
    batch = next_microbatch(reqs, free_slots=1, in_flight=0, limits=LIMITS, last_phase=None)
    assert batch.phase == "prefill" and batch.admit == (1,) and [r.key for r in batch.rows] == [1]


def test_prefill_respects_seq_and_token_budget_and_chunks():
    reqs = [view(1, False, 70), view(2, False, 70), view(3, False, 5)]
    batch = next_microbatch(reqs, 8, 0, LIMITS, None)
    assert [(r.key, r.tokens) for r in batch.rows] == [(1, 70), (2, 30)]  # 2 is chunked
    long = [view(1, False, 250)]
    assert [(r.key, r.tokens) for r in next_microbatch(long, 8, 0, LIMITS, None).rows] == [(1, 100)]


def test_phases_alternate_when_both_are_ready():
    reqs = [view(1), view(2), view(3, False, 10)]
    assert next_microbatch(reqs, 4, 0, LIMITS, last_phase="decode").phase == "prefill"
    assert next_microbatch(reqs, 4, 0, LIMITS, last_phase="prefill").phase == "decode"


def test_decode_spreads_requests_over_the_stages():
    reqs = [view(k) for k in range(1, 9)]
    batch = next_microbatch(reqs, 0, 0, LIMITS, None)
    assert batch.phase == "decode" and [r.key for r in batch.rows] == [1, 2, 3, 4]  # 8 over 2 in flight
    reqs = [view(k, in_flight=k <= 4) for k in range(1, 9)]
    assert [r.key for r in next_microbatch(reqs, 0, 1, LIMITS, None).rows] == [5, 6, 7, 8]


def test_a_request_is_never_in_two_batches():
    reqs = [view(1, in_flight=True), view(2, True, 10, in_flight=True)]
    assert next_microbatch(reqs, 4, 1, LIMITS, None) is None


def test_decode_capped_by_decode_seqs():
    limits = BatchLimits(2, 100, decode_seqs=3, max_in_flight=1)
    reqs = [view(k) for k in range(1, 9)]
    assert len(next_microbatch(reqs, 0, 0, limits, None).rows) == 3


def test_more_decoding_requests_than_a_micro_batch_holds_take_turns():
    """16 requests decode (16 KV slots) through one micro-batch of at most 8 rows in flight: each
    batch goes to those that waited longest, so no request waits for the first 8 to finish."""
    limits = BatchLimits(2, 100, decode_seqs=8, max_in_flight=1)
    last_sent = dict.fromkeys(range(1, 17), 0)
    rows = dict.fromkeys(last_sent, 0)
    for mb in range(1, 7):
        reqs = [RequestView(k, True, 0, False, last_sent=sent) for k, sent in last_sent.items()]
        batch = next_microbatch(reqs, 0, 0, limits, "decode")
        assert len(batch.rows) == 8
        for row in batch.rows:
            last_sent[row.key] = mb
            rows[row.key] += 1
    assert set(rows.values()) == {3}, rows


AHEAD = BatchLimits(prefill_seqs=2, prefill_tokens=100, decode_seqs=8, max_in_flight=1, ahead=True)


def test_decode_ahead_lets_a_decode_row_follow_the_one_in_flight():
    reqs = [view(1, in_flight=True), RequestView(2, True, 0, True, can_follow=True), view(3)]
    batch = next_microbatch(reqs, 0, 1, AHEAD, "decode")
    assert batch.phase == "decode" and [r.key for r in batch.rows] == [2, 3]
    assert next_microbatch(reqs, 0, 2, AHEAD, "decode") is None, "one computing, one queued behind it"
    assert next_microbatch(reqs, 0, 1, BatchLimits(2, 100, 8, max_in_flight=1), "decode") is None


def test_decode_ahead_still_alternates_with_prompts():
    reqs = [RequestView(1, True, 0, True, can_follow=True), view(2, False, 10)]
    assert next_microbatch(reqs, 1, 1, AHEAD, "decode").phase == "prefill"
    assert next_microbatch(reqs, 1, 1, AHEAD, "prefill").phase == "decode"


MIXING = BatchLimits(prefill_seqs=2, prefill_tokens=100, decode_seqs=8, max_in_flight=1, mix_tokens=104)


def test_decode_rows_ride_in_the_prefill_micro_batch_where_stages_mix():
    reqs = [view(1), view(2), view(3, False, 500), view(4, False, 50)]
    batch = next_microbatch(reqs, 4, 0, MIXING, "prefill")
    assert batch.phase == "prefill" and batch.admit == (3,)
    assert [(r.key, r.tokens) for r in batch.rows] == [(1, 1), (2, 1), (3, 100)], "prompt tokens take the rest"
    tight = BatchLimits(2, 100, 8, 1, mix_tokens=52)
    assert [(r.key, r.tokens) for r in next_microbatch(reqs, 4, 0, tight, None).rows] == [(1, 1), (2, 1), (3, 50)]
    full = BatchLimits(2, 100, 8, 1, mix_tokens=2)
    assert next_microbatch(reqs, 4, 0, full, None).phase == "decode", "no room left for prompt tokens"


def test_mixing_needs_both_kinds_of_work():
    assert next_microbatch([view(1), view(2)], 4, 0, MIXING, None).phase == "decode"
    batch = next_microbatch([view(1, False, 30)], 4, 0, MIXING, None)
    assert batch.phase == "prefill" and [(r.key, r.tokens) for r in batch.rows] == [(1, 30)]
