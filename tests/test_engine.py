"""The leader's engine without sockets: malformed and lost micro-batches never hang requests."""

from __future__ import annotations

import time

import pytest

from hetserve.config import Limits
from hetserve.leader.engine import Engine, Overloaded
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


def test_queued_prompt_tokens_are_bounded():
    sent = []
    engine = Engine(Limits(max_seqs=1, max_context=64, max_queued=10, max_queued_tokens=5), {2},
                    lambda ids: "", lambda step, ids: sent.append(step), vocab_size=100)
    engine.pipeline_ready(1)
    engine.new_request("a", [].append, [5, 6, 7], 4, 0.0, 0, 1.0, 1, (), True)  # takes the slot
    engine.new_request("b", [].append, [5, 6, 7], 4, 0.0, 0, 1.0, 1, (), True)  # waits: 3 tokens queued
    with pytest.raises(Overloaded, match="prompt tokens are queued"):
        engine.new_request("c", [].append, [5, 6, 7], 4, 0.0, 0, 1.0, 1, (), True)
    engine.new_request("d", [].append, [5, 6], 4, 0.0, 0, 1.0, 1, (), True)  # 3 + 2 fits


def test_replay_refeeds_the_whole_history_and_continues_the_token_count():
    engine, sent = make_engine()
    events = []
    start(engine, events)
    engine.on_result(StepResult(sent[-1].mb, [11], [1.0]))  # prefill -> first token
    engine.on_result(StepResult(sent[-1].mb, [12], [1.0]))  # decode -> second token
    lost = sent[-1]  # the decode in flight when the pipeline broke
    epoch = engine.replay_all()
    engine.on_result(StepResult(lost.mb, [99], [1.0], lost.epoch))  # a stale result is ignored
    engine.pipeline_ready(1)
    replay = sent[-1]
    assert replay.epoch == epoch and replay.phase == "prefill"
    assert replay.starts == [0] and replay.lengths == [5]  # prompt (3) + the 2 tokens generated
    assert replay.sampling.step == [2], "the next token is sampled as the third, as before the fault"
    engine.on_result(StepResult(replay.mb, [13], [1.0], epoch))
    assert [e["token_id"] for e in events if e["event"] == "token"] == [11, 12, 13]


def test_history_slices_prompt_and_generated_as_one_sequence():
    engine, sent = make_engine()
    request = start(engine, [])
    request.generated = [11, 12]
    whole = request.prompt_ids + request.generated  # [5, 6, 7, 11, 12]
    for begin in range(len(whole) + 1):
        for count in range(len(whole) - begin + 1):
            assert request.history(begin, count) == whole[begin: begin + count]
