"""The leader's engine without sockets: malformed and lost micro-batches never hang requests."""

from __future__ import annotations

import time

import pytest

from hetserve.config import Limits
from hetserve.leader.engine import Engine, Overloaded
from hetserve.wire.messages import StepFailed, StepResult


def make_engine(stages=1, flat_tokens=0, gpu=True, **limits):
    sent = []
    engine = Engine(Limits(**{"max_seqs": 2, "max_context": 64, **limits}), {2},
                    lambda ids: "".join(chr(97 + i % 26) for i in ids), lambda step, ids: sent.append(step),
                    vocab_size=100)
    engine.pipeline_ready(stages, flat_tokens, gpu)
    return engine, sent


def start(engine, events, max_tokens=4, request_id="r"):
    return engine.new_request(request_id, events.append, [5, 6, 7], max_tokens, 0.0, 0, 1.0, 1, (), True)


def answer(engine, *tokens):
    """The pipeline returns its oldest micro-batch in flight (a stage keeps send order)."""
    engine.on_result(StepResult(min(engine.in_flight), list(tokens), [1.0]))


@pytest.mark.parametrize("ahead", ["auto", "off"])
def test_a_result_is_turned_into_tokens_and_slots_come_back(ahead):
    engine, sent = make_engine(decode_ahead=ahead)
    events = []
    start(engine, events)
    for token in (11, 12, 13, 14):
        answer(engine, token)
    assert [e["token_id"] for e in events[:-1]] == [11, 12, 13, 14] and events[-1]["event"] == "done"
    assert events[-1]["finish_reason"] == "length" and len(engine.free_slots) == 2 and not engine.in_flight
    assert len(sent) == 4, "no row is computed past max_tokens"


def test_decode_ahead_queues_the_next_row_before_the_token_is_back():
    engine, sent = make_engine()
    start(engine, [], max_tokens=10)
    answer(engine, 11)  # prefill -> first token
    first, follower = sent[-2:]
    assert first.phase == follower.phase == "decode" and len(engine.in_flight) == 2
    assert first.feeds == [] and first.starts == [3] and first.sampling.step == [1]
    assert follower.feeds == [0] and follower.starts == [4] and follower.sampling.step == [2]
    assert follower.slots == first.slots
    answer(engine, 12)
    assert sent[-1].feeds == [0] and sent[-1].starts == [5] and sent[-1].sampling.step == [3]
    assert engine.snapshot()["batching"]["decode_ahead"]


def test_decode_ahead_drops_the_row_after_an_eos():
    engine, sent = make_engine()
    events = []
    start(engine, events, max_tokens=10)
    answer(engine, 11)
    answer(engine, 2)  # EOS: the follower in flight computed a row for nothing
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "stop"
    assert len(engine.free_slots) == 2 and len(engine.in_flight) == 1
    answer(engine, 13)  # the wasted row's result
    assert events[-1]["event"] == "done" and [e["token_id"] for e in events[:-1]] == [11, 2]
    assert not engine.in_flight and not engine.requests


def test_a_freed_slot_taken_while_a_wasted_row_is_in_flight_starts_clean():
    engine, sent = make_engine(max_seqs=1)
    first, second = [], []
    start(engine, first, max_tokens=10)
    start(engine, second, max_tokens=2, request_id="s")  # waits for the one slot
    answer(engine, 11)
    answer(engine, 2)  # EOS: the slot goes to "s" while the follower is still in flight
    prefill = sent[-1]
    assert prefill.phase == "prefill" and prefill.starts == [0] and prefill.feeds == []
    answer(engine, 13)  # the wasted row
    answer(engine, 21)  # "s": prefill -> first token; its decode row is not fed (its token is known)
    assert sent[-1].feeds == [] and sent[-1].starts == [3]
    answer(engine, 22)
    assert [e["token_id"] for e in second if e["event"] == "token"] == [21, 22]


@pytest.mark.parametrize("stages, ahead, gpu", [(2, "on", True), (1, "off", True), (1, "auto", False)])
def test_no_decode_ahead_past_one_stage_off_or_on_a_cpu_unless_asked(stages, ahead, gpu):
    engine, sent = make_engine(stages, decode_ahead=ahead, gpu=gpu)
    start(engine, [], max_tokens=10)
    answer(engine, 11)
    assert len(engine.in_flight) == 1 and sent[-1].feeds == []
    assert not engine.snapshot()["batching"]["decode_ahead"]


def test_decode_ahead_on_a_cpu_when_asked():
    engine, sent = make_engine(decode_ahead="on", gpu=False)
    start(engine, [], max_tokens=10)
    answer(engine, 11)
    assert len(engine.in_flight) == 2 and sent[-1].feeds == [0]


@pytest.mark.parametrize("ahead", ["on", "off"])
def test_with_decode_ahead_a_round_trip_starts_when_the_micro_batch_before_is_back(ahead):
    """Every micro-batch in flight is made 10 s older: queued behind the one before (decode-ahead),
    its own turn is what counts; alone in flight, all of those 10 s are its round trip."""
    engine, sent = make_engine(decode_ahead=ahead)
    start(engine, [], max_tokens=100)
    answer(engine, 11)
    for _ in range(6):
        for flight in engine.in_flight.values():
            flight.sent -= 10.0
        answer(engine, 12)
    assert (engine.decode_round_ms < 1000) == (ahead == "on")


def test_malformed_result_fails_the_requests_and_frees_slots():
    for tokens in ([11, 12], [-1], [100]):
        engine, sent = make_engine()
        events = []
        start(engine, events)
        engine.on_result(StepResult(sent[-1].mb, tokens, [1.0]))
        assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "internal"
        assert len(engine.free_slots) == 2 and not engine.in_flight and not engine.requests


@pytest.mark.parametrize("ms", [float("nan"), float("inf"), -1.0])
def test_stage_times_that_are_not_times_are_not_measured(ms):
    """A NaN from a faulty host stayed in the averages, and sizing the next micro-batches raised
    (int(NaN)) in every schedule() after: nothing was sent again."""
    engine, sent = make_engine()
    events = []
    start(engine, events, max_tokens=3)
    engine.on_result(StepResult(min(engine.in_flight), [11], [ms]))
    for token in (12, 13):
        answer(engine, token)
    assert [e["token_id"] for e in events[:-1]] == [11, 12, 13] and events[-1]["finish_reason"] == "length"
    start(engine, events, max_tokens=2, request_id="next")  # scheduling still works
    assert engine.in_flight


def test_a_new_pipeline_is_measured_afresh():
    """Stage times of a pipeline that is gone sized the next one and stayed in status."""
    engine, sent = make_engine(stages=2)
    start(engine, [], max_tokens=3)
    engine.on_result(StepResult(min(engine.in_flight), [11], [5.0, 7.0]))
    assert engine.snapshot()["stage_ms"]["prefill"] == [5.0, 7.0]
    engine.replay_all()
    engine.pipeline_ready(1, 0, True)
    assert engine.snapshot()["stage_ms"] == {"prefill": [], "decode": []} and engine.decode_round_ms == 0.0


@pytest.mark.parametrize("ahead", ["on", "off"])
def test_a_row_a_stage_fails_re_prefills_its_history_once(ahead):
    """A stage's error (its device lost, an out-of-memory on a prompt chunk that decode rows of
    others rode in) failed every request in the micro-batch: with one decode micro-batch of all
    running requests, every one of them. Each now re-prefills its history once; a row sent before
    (decode-ahead's follower) counts for nothing; a second failure ends the request."""
    engine, sent = make_engine(decode_ahead=ahead)
    events = []
    start(engine, events, max_tokens=6)
    answer(engine, 11)  # prefill -> its first token
    answer(engine, 12)
    failed = min(engine.in_flight)
    engine.on_failure(StepFailed(failed, 0, "CUDA error: an illegal memory access", engine.epoch))
    assert not [e for e in events if e["event"] == "error"]
    if ahead == "on":  # the follower of the failed row is still in flight: its result is skipped
        assert len(engine.in_flight) == 1 and sent[-1].feeds == [0]
        answer(engine, 99)
    replay = sent[-1]
    assert replay.phase == "prefill" and replay.starts == [0] and replay.lengths == [3 + 2]  # prompt + 11, 12
    assert replay.sampling.step == [2]  # the failed row's token again, from its seeded draw
    for token in (13, 14, 15, 16):
        answer(engine, token)
    assert [e["token_id"] for e in events if e["event"] == "token"] == [11, 12, 13, 14, 15, 16]
    assert events[-1]["event"] == "done" and not engine.in_flight and len(engine.free_slots) == 2

    start(engine, events, max_tokens=6, request_id="twice")
    engine.on_failure(StepFailed(min(engine.in_flight), 0, "CUDA error", engine.epoch))  # its device is lost:
    engine.replay_all()  # the host's exit replays everything into a new pipeline, where it may retry again
    engine.pipeline_ready(1, 0, True)
    for _ in range(2):
        engine.on_failure(StepFailed(min(engine.in_flight), 0, "out of memory", engine.epoch))
    assert events[-1]["event"] == "error" and "stage 0 failed: out of memory" in events[-1]["error"]["message"]
    assert not engine.requests and len(engine.free_slots) == 2


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
    # A prompt past the bound on its own waits when nothing else does ("try again later" never helped).
    engine = Engine(Limits(max_seqs=1, max_context=64, max_queued=10, max_queued_tokens=5), {2},
                    lambda ids: "", lambda step, ids: sent.append(step), vocab_size=100)
    engine.pipeline_ready(1)
    engine.new_request("a", [].append, [5, 6, 7], 4, 0.0, 0, 1.0, 1, (), True)
    engine.new_request("long", [].append, list(range(3, 23)), 4, 0.0, 0, 1.0, 1, (), True)
    with pytest.raises(Overloaded, match="20 prompt tokens are queued"):
        engine.new_request("c", [].append, [5], 4, 0.0, 0, 1.0, 1, (), True)


def test_replay_refeeds_the_whole_history_and_continues_the_token_count():
    engine, sent = make_engine()
    events = []
    start(engine, events)
    answer(engine, 11)  # prefill -> first token
    answer(engine, 12)  # decode -> second token
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


@pytest.mark.parametrize("stages", [1, 2])
def test_decode_rows_ride_in_a_prompts_micro_batch_where_stages_run_rows_flat(stages):
    engine, sent = make_engine(stages, flat_tokens=2048, max_seqs=3, prefill_tokens=4)
    events = {key: [] for key in "abc"}
    engine.new_request("a", events["a"].append, [5, 6, 7], 10, 0.0, 0, 1.0, 1, (), True)
    answer(engine, 11)  # prefill -> first token; "a" decodes
    for key in "bc":
        engine.new_request(key, events[key].append, [8] * 10, 2, 0.0, 0, 1.0, 1, (), True)
    while engine.requests:
        answer(engine, *([13] * len(engine.in_flight[min(engine.in_flight)].rows)))
    mixed = [step for step in sent if step.phase == "prefill" and 1 in step.lengths and max(step.lengths) > 1]
    assert mixed and all(len(step.lengths) > 1 for step in mixed), "a's decode rows rode with prompt chunks"
    assert engine.snapshot()["batching"]["mix_tokens"] == 2048
    assert engine.snapshot()["batching"]["mixed_microbatches"] == len(mixed)
    for key, count in (("a", 10), ("b", 2), ("c", 2)):
        assert [e["event"] for e in events[key]] == ["token"] * count + ["done"], key
        assert events[key][-1]["finish_reason"] == "length"
    assert len(engine.free_slots) == 3 and not engine.in_flight


def test_no_mixing_where_a_stage_pads_rows_or_when_off():
    for engine, _ in (make_engine(flat_tokens=0), make_engine(flat_tokens=2048, mixed_batches=False)):
        assert engine.snapshot()["batching"]["mix_tokens"] == 0


def test_a_request_failed_by_its_next_send_gets_nothing_after_its_error():
    """A result's tokens were streamed after the next micro-batch was sent: when that send failed
    and failed the request, its client got `error` and then a token (or even `done`)."""
    calls = []

    def send(step, ids):
        calls.append(step)
        if len(calls) == 2:
            raise OverflowError("int too big to convert")

    engine = Engine(Limits(max_seqs=2, max_context=64, decode_ahead="off"), {2}, lambda ids: "x", send,
                    vocab_size=100)
    engine.pipeline_ready(1, 0, True)
    events = []
    start(engine, events)
    answer(engine, 11)
    assert [e["event"] for e in events] == ["error"] and engine.outcomes["error"] == 1


def test_a_micro_batch_that_cannot_be_sent_fails_its_rows_and_holds_nothing():
    """Counted in flight before a failed send, it held a pipeline place and its requests' slots
    until the step timeout (120 s), stalling everything behind it on one stage."""
    calls = []

    def send(step, ids):
        calls.append(step)
        if len(calls) == 1:
            raise OverflowError("int too big to convert")

    engine = Engine(Limits(max_seqs=2, max_context=64), {2}, lambda ids: "x", send, vocab_size=100)
    engine.pipeline_ready(1, 0, True)
    broken, fine = [], []
    start(engine, broken, request_id="broken")
    assert broken[-1]["event"] == "error" and "could not be sent" in broken[-1]["error"]["message"]
    assert not engine.in_flight and len(engine.free_slots) == 2
    start(engine, fine, request_id="fine")
    answer(engine, 11)
    assert fine[0]["event"] == "token" and len(calls) >= 2
