"""Link numbers from probe round trips (leader/link.py), and the probes themselves on the control
channel (leader/control.py)."""

import asyncio

import pytest
import zmq
import zmq.asyncio

from hetserve.leader import control
from hetserve.leader.link import link_from_round_trips
from hetserve.wire.codec import decode
from hetserve.wire.messages import Alive, Probe


def test_latency_is_half_the_fastest_round_trip_and_bandwidth_the_payloads_extra_time():
    link = link_from_round_trips([0.0012, 0.0010, 0.0030], [0.0110, 0.0090], large_bytes=10_000_000)
    assert link.latency_ms == 0.5
    assert link.gbps == 10.0  # 80 Mbit in 8 ms beyond the round trip


def test_a_link_too_fast_to_see_is_capped_not_infinite():
    link = link_from_round_trips([0.002], [0.001], large_bytes=1000)
    assert 0 < link.gbps < float("inf")



async def test_the_control_channel_times_probes_a_host_answers_and_gives_up_on_a_silent_one(monkeypatch):
    """leader/control.py over a real ROUTER/DEALER pair: probes answered come back as a Link,
    unanswered ones time out, and a send to a host that is gone returns its error, not raises."""
    monkeypatch.setattr(control, "LARGE_BYTES", 1 << 16)
    ctx = zmq.asyncio.Context()
    router, host = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://control")
    host.connect("inproc://control")
    await host.send(b"hello")  # the leader learns the host's routing id from its first message
    route, _ = await router.recv_multipart()
    channel = control.ControlChannel(router)

    async def answer(probes: int) -> None:  # the host replies; the leader's control loop hands the nonce back
        for _ in range(probes):
            channel.answered(decode(await host.recv(), expect=(Probe,)).nonce)

    answering = asyncio.create_task(answer(control.SMALL_PROBES + control.LARGE_PROBES))
    link = await channel.measure_link(route)
    await answering
    assert link.latency_ms >= 0 and link.gbps > 0 and not channel.probes

    monkeypatch.setattr(control, "PROBE_TIMEOUT_S", 0.05)
    with pytest.raises(asyncio.TimeoutError):
        await channel.measure_link(route)  # nobody answers now
    assert not channel.probes  # the waiter went with the timeout
    assert isinstance(await channel.send(b"no-such-host", Alive()), zmq.ZMQError)
    assert await channel.send(route, Alive()) is None
    router.close(0)
    host.close(0)
    ctx.term()
