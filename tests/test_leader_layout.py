"""The leader's layout runs and host watch (leader/assignment.py) while hosts come and go, without
sockets: layouts, sends and the clock of a real Leader, its I/O replaced by recorders."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from hetserve.config import LeaderSettings
from hetserve.leader.assignment import LeaderError
from hetserve.leader.daemon import Leader
from hetserve.leader.engine import Engine
from hetserve.leader.hosts import HostRecord
from hetserve.wire.messages import Alive, Assign, Failed, Inventory

INVENTORY = Inventory("cpu", "cpu", "x86", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)


def record(name: str, route: bytes, state: str = "joined") -> HostRecord:
    return HostRecord(name, route, "127.0.0.1", INVENTORY, f"tcp://127.0.0.1:{7000 + len(route)}", 0.0, "float32",
                      state=state, last_seen=time.monotonic())


class Sent(list):
    """What the leader sent, as (route, message)."""

    async def send(self, route: bytes, msg) -> None:
        self.append((route, msg))

    async def send_host(self, host: HostRecord, msg) -> None:
        self.append((host.route, msg))

    def of(self, kind) -> list[tuple[bytes, object]]:
        return [(route, msg) for route, msg in self if isinstance(msg, kind)]


@pytest.fixture
def leader():
    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    leader.engine = Engine(leader.settings.limits, {0}, lambda ids: "", lambda step, ids: None, 100)
    leader.num_layers, leader.manifest, leader.results_port, leader.weights_port = 30, SimpleNamespace(model_hash="h"), 1, 2
    leader.sent = Sent()
    leader.channel = SimpleNamespace(send=leader.sent.send)
    leader._send_host = leader.sent.send_host
    return leader


def test_a_host_that_comes_back_while_a_layout_is_made_gets_the_next_layout(leader):
    """h1 reconnects (a new connection) while the layout that holds its old record awaits: that
    layout is dropped unsent (an Assign to a gone connection, a stage nobody watches for silence,
    the cluster loading for ever), and the next one goes to the hosts as they are."""
    leader.hosts = {"h0": record("h0", b"r0"), "h1": record("h1", b"old")}
    leader.state, leader.served = "serving", True
    layouts = []

    async def fitting_layout():
        order = leader._candidates()
        layouts.append([h.route for h in order])
        if len(layouts) == 1:
            await asyncio.sleep(0)  # a live plan runs on a thread meanwhile
            leader.hosts["h1"] = record("h1", b"new")  # what _join does, then:
            await leader._maybe_assign()
        return order, [(0, 15), (15, 30)], [[], []]

    leader._fitting_layout = fitting_layout
    asyncio.run(leader._maybe_assign())
    assert layouts == [[b"r0", b"old"], [b"r0", b"new"]]
    assert sorted(route for route, _ in leader.sent.of(Assign)) == [b"new", b"r0"]
    assert leader.state == "loading" and leader.stages == [leader.hosts["h0"], leader.hosts["h1"]]
    assert all(h.planned for h in leader.hosts.values())
    assert [h.current.start for h in leader.stages] == [0, 15]  # what each holds now: adoptable later


def test_a_layout_that_cannot_be_made_is_not_retried_until_something_changes(leader):
    """Degraded, the leader was re-planning every second (its sit-out check calls _maybe_assign)
    for a host that no layout could use; a new host lays out again."""
    leader.hosts = {"h0": record("h0", b"r0")}
    leader.state, leader.served = "serving", True
    tries = []

    async def fitting_layout():
        tries.append(len(leader._candidates()))
        raise LeaderError("the model does not fit")

    leader._fitting_layout = fitting_layout
    for _ in range(3):
        asyncio.run(leader._maybe_assign())
    assert tries == [1] and leader.state == "degraded"
    leader.hosts["h1"] = record("h1", b"r1")
    asyncio.run(leader._maybe_assign())
    assert tries == [1, 2]


def test_hosts_hear_alive_while_a_lost_host_is_laid_out_around(leader):
    """A layout started by the expire loop (a host went silent) held that loop, and with it the
    Alive beat: past LEADER_DEAD_S every host joined again in the middle of the layout."""
    leader.hosts = {"h0": record("h0", b"r0", "ready"), "h1": record("h1", b"r1", "ready")}
    leader.hosts["h1"].last_seen = -1e9  # silent: lost at the first check
    leader.stages = list(leader.hosts.values())
    leader.state, leader.served = "serving", True

    beats_during = []

    def beats() -> int:
        return [route for route, _ in leader.sent.of(Alive)].count(b"r0")

    async def slow_layout():
        before = beats()
        await asyncio.sleep(2.5)
        beats_during.append(beats() - before)
        raise LeaderError("no plan")

    leader._fitting_layout = slow_layout

    async def scenario():
        loops = [asyncio.create_task(leader._expire_loop()), asyncio.create_task(leader._alive_loop())]
        for _ in range(300):  # until the layout ended (about 3.5 s), however slow the machine
            await asyncio.sleep(0.1)
            if beats_during and leader.state == "degraded":
                break
        for task in loops:
            task.cancel()

    asyncio.run(scenario())
    assert leader.hosts["h1"].state == "dead" and leader.state == "degraded"
    assert beats_during[0] >= 2


def test_a_failure_of_an_earlier_slice_does_not_count_against_the_latest(leader):
    """A host given a slice and then another (two layouts in a row) failed the first: charged to
    the second, it sat out for 30 s and more and the cluster was laid out without it. What counts
    is the host's latest Assign, not the leader's epoch (a later layout may have sent none)."""
    leader.hosts = {"h0": record("h0", b"r0", "loading"), "h1": record("h1", b"r1", "loading")}
    leader.hosts["h0"].current = Assign(0, 2, 0, 15, "m", 30, "float32", 4, 256, "tcp://x:1", epoch=5)
    leader.stages = list(leader.hosts.values())
    leader.state, leader.served = "loading", True
    leader.engine.epoch = 6  # a layout after h0's made nothing
    relaid = []

    async def fitting_layout():
        relaid.append(True)
        raise LeaderError("no plan")

    leader._fitting_layout = fitting_layout
    h0 = leader.hosts["h0"]
    asyncio.run(leader._host_message(h0, Failed("h0", "out of memory", 4)))
    assert h0.state == "loading" and not relaid and "h0" not in leader.failures
    asyncio.run(leader._host_message(h0, Failed("h0", "out of memory", 5)))
    assert h0.state == "failed" and relaid and "h0" in leader.failures


def test_a_layout_naming_a_host_dead_from_the_start_is_made_once(leader):
    """A --plan names its hosts whether they live or not (before serving): a check for dead hosts
    in the layout made it again and again, without yielding, and froze the leader."""
    leader.hosts = {"h0": record("h0", b"r0"), "h1": record("h1", b"r1", "dead")}
    made = []

    async def fitting_layout():
        made.append(True)
        if len(made) > 3:
            raise RuntimeError("laid out again and again")
        return list(leader.hosts.values()), [(0, 15), (15, 30)], [[], []]

    leader._fitting_layout = fitting_layout
    asyncio.run(leader._assign())
    assert len(made) == 1 and leader.state == "loading"
