"""The leader's engine without sockets: malformed and lost micro-batches never hang requests."""

from __future__ import annotations

import time

from hetserve.config import Limits
from hetserve.leader.engine import Engine
from hetserve.wire.messages import StepResult


def make_engine():
    sent = []
    engine = Engine(Limits(max_seqs=2, max_context=64), {2}, lambda ids: "".join(chr(97 + i % 26) for i in ids),
                    lambda step, ids: sent.append(step), vocab_size=100)
    engine.pipeline_ready(1)
    return engine, sent


def start(engine, events):
    return engine.new_request("r", events.append, [5, 6, 7], 4, 0.0, 0, 1.0, 1, (), True)


def test_a_result_is_turned_into_tokens_and_slots_come_back():
    engine, sent = make_engine()
    events = []
    start(engine, events)
    for _ in range(4):
        engine.on_result(StepResult(sent[-1].mb, [11], [1.0]))
    assert [e["event"] for e in events] == ["token"] * 4 + ["done"]
    assert events[-1]["finish_reason"] == "length" and len(engine.free_slots) == 2 and not engine.in_flight


def test_malformed_result_fails_the_requests_and_frees_slots():
    for tokens in ([11, 12], [-1], [100]):
        engine, sent = make_engine()
        events = []
        start(engine, events)
        engine.on_result(StepResult(sent[-1].mb, tokens, [1.0]))
        assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "internal"
        assert len(engine.free_slots) == 2 and not engine.in_flight and not engine.requests


def test_a_lost_microbatch_expires():
    engine, sent = make_engine()
    events = []
    start(engine, events)
    engine.expire(time.monotonic() - 60)  # not yet
    assert engine.in_flight
    engine.expire(time.monotonic() + 1)
    assert events[-1]["event"] == "error" and "did not come back" in events[-1]["error"]["message"]
    assert len(engine.free_slots) == 2 and not engine.requests
