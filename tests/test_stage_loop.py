"""A host's data path on one micro-batch (StageLoop.launch and finish, no sockets): token ids are checked
against the vocabulary before they reach the device, a good batch flows on, and a stage that is first
and last feeds a row the token its slot sampled (decode-ahead). The loop itself over a stand-in
socket: a spurious zmq.Again does not stop it, nor lose the leader's micro-batches for stage 0."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
import zmq

from hetserve.model.stage import StageModel, StageSpec
from hetserve.wire.codec import WireError, decode, encode
from hetserve.wire.messages import SamplingRows, Step, StepFailed, StepResult
from hetserve.wire.tensors import to_frame
from hetserve.worker.stage_loop import StageLoop


@pytest.fixture(scope="module")
def loop(model_dir):
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))
    return StageLoop(model, 0, data_in=None, data_out=None, torch_thread=None)


def step_of(ids: torch.Tensor) -> tuple[Step, list]:
    rows, tokens = ids.shape
    meta, frame = to_frame(ids)
    sampling = SamplingRows([0.0] * rows, [0] * rows, [1.0] * rows, [0] * rows, [0] * rows)
    return Step(1, "prefill", list(range(rows)), [0] * rows, [tokens] * rows, sampling, meta), [frame]


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(loop, bad):
    vocab = loop.model.embed.num_embeddings
    ids = torch.tensor([[5, 7, vocab if bad == "vocab" else bad]])
    with pytest.raises(WireError, match="out of the vocabulary"):
        loop.launch(*step_of(ids))


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("seed", -3)])
def test_sampling_values_a_stage_cannot_sample_with_are_refused(loop, field, value):
    """The leader never sends them; a faulty or hostile peer could, and one bad row failed the
    whole micro-batch in multinomial."""
    from dataclasses import replace

    step, frames = step_of(torch.tensor([[5, 7, 9]]))
    step = replace(step, sampling=replace(step.sampling, **{field: [value]}))
    with pytest.raises(WireError, match="sampling needs"):
        loop.launch(step, frames)


def test_a_good_micro_batch_goes_downstream(loop):
    header, frame = loop.finish(loop.launch(*step_of(torch.tensor([[5, 7, 9], [11, 13, 17]]))))
    step = decode(header, expect=(Step,))
    assert step.tensor.shape == [6, loop.model.hidden_size] and len(step.stage_ms) == 1  # packed tokens


def test_mixed_rows_cross_stages_as_their_real_tokens_alone(loop, model_dir):
    """A decode row beside a 5-token prompt row: the hidden states sent on are its 6 real tokens,
    not 2 x 5 padded, and the next stage computes from them what the two stages in one chain do."""
    from hetserve.wire.tensors import from_frame

    ids = torch.tensor([[9, 0, 0, 0, 0], [5, 7, 9, 11, 13]])
    meta, frame = to_frame(ids)
    sampling = SamplingRows([0.0] * 2, [0] * 2, [1.0] * 2, [0] * 2, [0] * 2)
    step = Step(2, "prefill", [0, 1], [0, 0], [1, 5], sampling, meta)
    header, hidden = loop.finish(loop.launch(step, [frame]))
    sent = decode(header, expect=(Step,))
    assert sent.tensor.shape == [6, loop.model.hidden_size]
    tail = StageLoop(StageModel(model_dir, StageSpec(2, 4, first=False, last=False, max_seqs=2, max_context=64)),
                     1, data_in=None, data_out=None, torch_thread=None)
    tail_header, out = tail.finish(tail.launch(sent, [bytes(hidden)]))
    got = from_frame(decode(tail_header, expect=(Step,)).tensor, bytes(out), (6, None), ("float32",),
                     torch.device("cpu"))

    head = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))
    middle = StageModel(model_dir, StageSpec(2, 4, first=False, last=False, max_seqs=2, max_context=64))
    args = [torch.tensor(v) for v in ([0, 1], [0, 0], [1, 5])]
    want = middle.forward(*args, head.forward(*args, ids))  # [2, 5, H], padding included
    torch.testing.assert_close(got, torch.cat([want[0, :1], want[1]]))


@pytest.fixture(scope="module")
def whole(model_dir):
    """A stage that is first and last: it keeps each slot's sampled token for decode-ahead."""
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=True, max_seqs=2, max_context=64))
    return StageLoop(model, 0, data_in=None, data_out=None, torch_thread=None)


def tokens_of(loop, step, frames) -> list[int]:
    return decode(loop.finish(loop.launch(step, frames))[0], expect=(StepResult,)).tokens


def test_a_fed_row_takes_the_token_its_slot_sampled(whole):
    prefill = step_of(torch.tensor([[5, 7, 9], [11, 13, 17]]))
    first = tokens_of(whole, *prefill)
    meta, frame = to_frame(torch.tensor([[0], [first[1]]]))  # row 0's token is fed, row 1's is sent
    sampling = SamplingRows([0.0] * 2, [0] * 2, [1.0] * 2, [0] * 2, [1] * 2)
    fed = tokens_of(whole, Step(2, "decode", [0, 1], [3, 3], [1, 1], sampling, meta, feeds=[0]), [frame])
    tokens_of(whole, *prefill)  # the same prompts again, then both tokens sent
    meta, frame = to_frame(torch.tensor([[first[0]], [first[1]]]))
    sent = tokens_of(whole, Step(3, "decode", [0, 1], [3, 3], [1, 1], sampling, meta), [frame])
    assert fed == sent
    assert whole.model.sampled.tolist() == sent


def test_feeds_are_refused_where_they_cannot_be_honoured(loop, whole):
    step, frames = step_of(torch.tensor([[5]]))
    with pytest.raises(WireError, match="first and last"):
        loop.launch(replace(step, feeds=[0]), frames)  # stage 0 of two: it samples nothing
    for feeds in ([1], [0, 0]):
        with pytest.raises(WireError, match="distinct rows of one token"):
            whole.launch(replace(step, feeds=feeds), frames)
    step, frames = step_of(torch.tensor([[5, 7]]))
    with pytest.raises(WireError, match="distinct rows of one token"):
        whole.launch(replace(step, feeds=[0]), frames)


class FlakySocket:
    """A data socket whose first receive and first send fail with zmq.Again, as pyzmq's asyncio
    socket can when a readiness it woke on is gone (CURVE handshakes under load)."""

    def __init__(self, messages: list[list]):
        self.messages = messages
        self.sent: list[list] = []
        self.again = {"recv": True, "send": True}

    async def recv_multipart(self, copy: bool = True) -> list:
        if self.again.pop("recv", False):
            raise zmq.Again()
        if not self.messages:
            await asyncio.Event().wait()  # nothing more comes
        return self.messages.pop(0)

    async def send_multipart(self, frames: list, copy: bool = True) -> None:
        if self.again.pop("send", False):
            raise zmq.Again()
        self.sent.append(frames)


async def test_a_spurious_again_does_not_stop_the_stage(model_dir):
    """Taken as an error, zmq.Again ended the receive loop: every later micro-batch was never read."""
    step, frames = step_of(torch.tensor([[5, 7, 9]]))
    socket = FlakySocket([[zmq.Frame(encode(step)), *(zmq.Frame(bytes(f)) for f in frames)]])
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))
    with ThreadPoolExecutor(1) as torch_thread:
        stage = asyncio.create_task(StageLoop(model, 0, socket, socket, torch_thread).run())
        for _ in range(600):
            if socket.sent or stage.done():
                break
            await asyncio.sleep(0.05)
        assert not stage.done(), stage.exception()
        stage.cancel()
        await asyncio.gather(stage, return_exceptions=True)
    assert decode(socket.sent[0][0], expect=(Step,)).mb == step.mb


async def test_stopping_a_stage_waits_for_the_step_on_the_torch_thread():
    """The old stage's memory is released right after _stop_stage: a step still running on the
    torch thread then held it, and the next slice could load into a full device."""
    import threading

    from hetserve.config import HostSettings
    from hetserve.worker.host import Host

    host = Host(HostSettings("127.0.0.1:1", name="h0"))
    release, done = threading.Event(), []

    def step():
        release.wait(5)
        done.append(True)

    async def loop():
        await host._offload(step)

    host.stage_task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)  # the step is on the torch thread
    stopping = asyncio.create_task(host._stop_stage())
    await asyncio.sleep(0.1)
    assert not stopping.done(), "stopped while a step still held the stage"
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert done and host.stage_task is None
    host.torch_thread.shutdown()


async def test_a_stage_loop_that_stops_is_reported_to_the_leader():
    """Anything but cancellation ending a stage loop is sent to the leader as Failed (it re-plans
    and replays at once); a cancelled loop (a new assignment) is not."""
    from hetserve.config import HostSettings
    from hetserve.wire.messages import Failed
    from hetserve.worker.host import Host

    host = Host(HostSettings("127.0.0.1:1", name="h0"))
    sent = []

    class Control:
        async def send(self, data: bytes) -> None:
            sent.append(data)

    async def broken():
        raise zmq.ZMQError(zmq.ENOTSOCK, "socket operation on non-socket")

    host.control = Control()
    for coroutine in (broken(), asyncio.Event().wait()):
        task = asyncio.create_task(coroutine)
        task.add_done_callback(functools.partial(host._stage_ended, epoch=7))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.gather(*host._tasks)
    host.torch_thread.shutdown()
    assert len(sent) == 1
    failed = decode(sent[0], expect=(Failed,))
    assert failed.host == "h0" and "the stage loop stopped: ZMQError" in failed.reason
    assert failed.epoch == 7  # of the stage's Assign: a Failed of a layout ago is told apart


@pytest.mark.parametrize("error", [getattr(torch, "AcceleratorError", RuntimeError), RuntimeError])  # torch < 2.8
@pytest.mark.parametrize("survives", [True, False])
async def test_a_device_that_fails_for_good_ends_the_stage(model_dir, monkeypatch, survives, error):
    """A CUDA error that poisons the context (no GPU here: the error and the probe after it are
    stand-ins) failed every later micro-batch while the host heartbeat on as healthy. The failed
    micro-batch still goes on as StepFailed; then the loop ends with DeviceLost, unless the device
    still runs a kernel (an error that one call survives, e.g. a bad launch configuration)."""
    from hetserve.worker import stage_loop

    step, frames = step_of(torch.tensor([[5, 7, 9]]))
    message = [zmq.Frame(encode(step)), *(zmq.Frame(bytes(f)) for f in frames)]
    socket = FlakySocket([message, message])
    socket.again.clear()
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))

    def broken(*args):
        raise error("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "run", broken)
    monkeypatch.setattr(stage_loop, "device_works", lambda device: survives)
    with ThreadPoolExecutor(1) as torch_thread:
        stage = asyncio.create_task(StageLoop(model, 0, socket, socket, torch_thread).run())
        for _ in range(200):
            if len(socket.sent) == 2 or stage.done():
                break
            await asyncio.sleep(0.02)
        ended = stage.done()
        stage.cancel()
        await asyncio.gather(stage, return_exceptions=True)
    if survives:
        assert not ended and len(socket.sent) == 2, "each micro-batch fails alone, the stage serves on"
    else:
        assert ended, "the stage served on with a device that fails every kernel"
    assert "illegal memory access" in decode(socket.sent[0][0], expect=(StepFailed,)).error
    if not survives:
        with pytest.raises(stage_loop.DeviceLost, match="fails every kernel"):
            stage.result()


async def test_a_host_whose_device_failed_tells_the_leader_and_exits():
    """DeviceLost from the stage loop: the leader hears Failed, and the host's session ends in
    HostError (exit status 1: systemd restarts it with a fresh CUDA context)."""
    from hetserve.config import HostSettings
    from hetserve.wire.messages import Failed
    from hetserve.worker.host import Host, HostError
    from hetserve.worker.stage_loop import DeviceLost

    host = Host(HostSettings("127.0.0.1:1", name="h0"))
    sent = []

    class Control:
        async def send(self, data: bytes) -> None:
            sent.append(data)

        async def recv_multipart(self, copy: bool = True) -> list:
            await asyncio.Event().wait()  # the leader says nothing meanwhile

    async def lost():
        raise DeviceLost("cuda:0 fails every kernel since AcceleratorError: CUDA error: an illegal memory access")

    host.control = Control()
    session = asyncio.create_task(host._session())
    task = asyncio.create_task(lost())
    task.add_done_callback(host._stage_ended)
    with pytest.raises(HostError, match="its device failed: cuda:0 fails every kernel.*fresh device context"):
        await asyncio.wait_for(session, 10)
    await asyncio.gather(*host._tasks)
    host.torch_thread.shutdown()
    assert "its device failed" in decode(sent[0], expect=(Failed,)).reason


async def test_the_leader_sends_every_micro_batch_in_order_through_a_spurious_again():
    """The engine's sends to stage 0 were un-awaited futures: one failing with zmq.Again lost its
    micro-batch (a step timeout, then a replay). They now queue for one sender, which waits again."""
    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader

    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    leader.to_stage0 = FlakySocket([])
    step, _ = step_of(torch.tensor([[5, 7, 9]]))
    for mb in (1, 2, 3):
        leader._send_step(replace(step, mb=mb), torch.tensor([[5, 7, 9]]))
    sender = asyncio.create_task(leader._stage0_sender())
    for _ in range(100):
        if len(leader.to_stage0.sent) == 3:
            break
        await asyncio.sleep(0.01)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    assert [decode(frames[0], expect=(Step,)).mb for frames in leader.to_stage0.sent] == [1, 2, 3]


async def test_a_request_tokenized_while_the_cluster_degrades_is_refused():
    """The hosts can go while a request is tokenized (in an executor): it must be refused as
    `unavailable` then, not queued for a pipeline that no longer exists (it would wait for a host
    to rejoin, maybe forever)."""
    from types import SimpleNamespace

    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader
    from hetserve.wire.client import ProtocolError, parse_line

    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    leader.state = "serving"

    def encode(request):
        leader.state = "degraded"  # as _assign_once does when too few hosts are left
        return [1, 2, 3]

    leader.codec = SimpleNamespace(encode=encode, max_context=64)
    leader.engine = SimpleNamespace(new_request=lambda *args: pytest.fail("queued for a pipeline that is gone"))
    with pytest.raises(ProtocolError) as refused:
        await leader.admit(parse_line(b'{"id": "r1", "prompt": "Hi"}'), lambda event: None, True)
    assert (refused.value.code, refused.value.request_id) == ("unavailable", "r1")


async def test_a_join_with_a_data_address_zeromq_cannot_connect_to_is_refused():
    """Whoever connects to a host's data address (its upstream stage, or the leader for stage 0)
    would raise on one ZeroMQ cannot parse and stop: such a Join is refused at the door."""
    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader
    from hetserve.transport.sockets import is_tcp_endpoint
    from hetserve.wire.messages import Inventory, Join, Refused

    assert is_tcp_endpoint("tcp://10.0.0.5:5600") and is_tcp_endpoint("tcp://[fe80::1]:5600")
    assert is_tcp_endpoint("tcp://gpu-box_2.local:5600")
    assert not any(map(is_tcp_endpoint, ("garbage", "tcp://10.0.0.5", "tcp://10.0.0.5:0", "tcp://10.0.0.5:70000",
                                         "ipc:///tmp/x", "tcp://a b:1", "tcp://10.0.0.5:5600\n")))
    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    sent = []

    class Channel:
        async def send(self, route, msg):
            sent.append((route, msg))

    leader.channel = Channel()
    inventory = Inventory("cpu", "cpu", "x86_64", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)
    await leader._join(b"h1", "10.0.0.5", "", Join("h1", inventory, "garbage"))
    assert not leader.hosts and len(sent) == 1 and isinstance(sent[0][1], Refused)
    assert "is not tcp://HOST:PORT" in sent[0][1].reason


def test_a_host_that_failed_to_load_its_slice_sits_out_longer_each_time():
    """A host that fails to load its slice rejoins within seconds; planned in at once, it would fail again
    and re-plan the cluster (replaying every request) about every 10 s, for ever."""
    import time

    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader
    from hetserve.leader.hosts import FAILED_SITS_OUT_MAX_S, FAILED_SITS_OUT_S, Failures, HostRecord
    from hetserve.wire.messages import Inventory

    first = Failures().after_failure(100.0)
    assert (first.count, first.until) == (1, 100.0 + FAILED_SITS_OUT_S)
    assert first.after_failure(200.0).until == 200.0 + 2 * FAILED_SITS_OUT_S
    many = Failures()
    for _ in range(20):
        many = many.after_failure(0.0)
    assert many.until == FAILED_SITS_OUT_MAX_S

    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    inventory = Inventory("cpu", "cpu", "x86_64", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)
    for name in ("h0", "h1"):
        leader.hosts[name] = HostRecord(name, name.encode(), "127.0.0.1", inventory, "tcp://127.0.0.1:1", 0.0, "float32")
    leader._sit_out(leader.hosts["h1"])  # what a Failed while loading does
    assert leader.failures["h1"].count == 1 and [h.name for h in leader._candidates()] == ["h0"]
    leader.failures["h1"] = Failures(1, time.monotonic() - 1)  # its time is up: planned in again
    assert [h.name for h in leader._candidates()] == ["h0", "h1"]


def test_silence_counts_only_while_the_leader_listens():
    """A layout (a live plan measures for seconds to minutes) runs inside the control loop, which
    reads no heartbeat meanwhile: hosts must not be buried for the leader's own deafness."""
    import time

    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader
    from hetserve.leader.hosts import BUSY_DEAD_AFTER_SECONDS, HostRecord
    from hetserve.wire.messages import Inventory

    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    inventory = Inventory("cpu", "cpu", "x86_64", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)
    now = time.monotonic()
    host = HostRecord("h0", b"h0", "127.0.0.1", inventory, "tcp://127.0.0.1:1", 0.0, "float32",
                      last_seen=now - 2 * BUSY_DEAD_AFTER_SECONDS)  # its last heartbeat read before the layout
    leader.assigning = True
    assert leader._silent_for(host, now) == 0.0
    leader.assigning, leader.listening_since = False, now - 1.0  # the layout just ended
    assert leader._silent_for(host, now) == pytest.approx(1.0)
    leader.listening_since = 0.0  # listening all along: it is as silent as it looks
    assert leader._silent_for(host, now) == pytest.approx(2 * BUSY_DEAD_AFTER_SECONDS)
