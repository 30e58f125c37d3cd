"""The leader's pure layout pieces (leader/layout.py): adoption after a restart, plan checks, the
layout chosen, and the Assign each stage gets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetserve.config import LeaderSettings, Limits
from hetserve.leader.hosts import HostRecord
from hetserve.leader.layout import adoptable, choose_layout, plan_layout, stage_assigns
from hetserve.plan.planner import Plan, PlannedStage, Workload
from hetserve.plan.split import ModelShape, PlanError
from hetserve.wire.messages import Assign, Inventory

INVENTORY = Inventory("cpu", "cpu", "x86", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)
SETTINGS = LeaderSettings(limits=Limits(max_seqs=4, max_context=256))


def host(name: str, held: tuple[int, int, int, int] | None) -> HostRecord:
    current = None
    if held:
        stage, stages, start, end = held
        current = Assign(stage, stages, start, end, "m", 30, "float32", 4, 256, "tcp://x:1", model_hash="h")
    return HostRecord(name, b"r", "127.0.0.1", INVENTORY, "tcp://x:1", 0.0, "float32", current=current)


def test_a_whole_held_pipeline_is_adopted_in_stage_order():
    hosts = [host("b", (1, 2, 12, 30)), host("a", (0, 2, 0, 12))]
    order, ranges, precisions = adoptable(hosts, "h", 30, SETTINGS)
    assert [h.name for h in order] == ["a", "b"] and ranges == [(0, 12), (12, 30)]


@pytest.mark.parametrize("hosts, model_hash", [
    ([host("a", (0, 2, 0, 12)), host("b", None)], "h"),  # one holds nothing
    ([host("a", (0, 2, 0, 12)), host("b", (1, 2, 13, 30))], "h"),  # a gap
    ([host("a", (0, 2, 0, 12))], "h"),  # half a pipeline
    ([host("a", (0, 2, 0, 12)), host("b", (1, 2, 12, 30))], "other"),  # another model
])
def test_anything_less_is_not_adopted(hosts, model_hash):
    assert adoptable(hosts, model_hash, 30, SETTINGS) is None


def test_slices_a_host_claims_are_checked_before_adoption():
    """A host's Join says what it holds: more w8a8 precisions than layers made the leader index
    past the calibration scales (IndexError in stage_assigns, which ended the leader)."""
    a, b = host("a", (0, 2, 0, 20)), host("b", (1, 2, 20, 30))
    b.current = replace(b.current, precisions=["w8a8"] * 40)
    assert adoptable([a, b], "h", 30, SETTINGS) is None
    b.current = replace(b.current, precisions=["int8"] * 10)
    assert adoptable([a, b], "h", 30, SETTINGS) is not None
    empty = [host("a", (0, 3, 0, 20)), host("b", (1, 3, 20, 20)), host("c", (2, 3, 20, 30))]
    assert adoptable(empty, "h", 30, SETTINGS) is None


def plan(bounds, precisions=()):
    stages = [PlannedStage(f"h{i}", a, b, list(precisions) or [], 1.0, 1.0, 1, 2) for i, (a, b) in enumerate(bounds)]
    return Plan("m", "float32", Workload(), 0.02, 1.0, 1.0, stages, 1, 1, 1.0)


def test_plan_layout_checks_hosts_and_coverage():
    hosts = {"h0": host("h0", None), "h1": host("h1", None)}
    order, ranges, _ = plan_layout(plan([(0, 10), (10, 30)]), hosts, 30)
    assert [h.name for h in order] == ["h0", "h1"] and ranges == [(0, 10), (10, 30)]
    with pytest.raises(PlanError, match="do not cover"):
        plan_layout(plan([(0, 10), (11, 30)]), hosts, 30)
    with pytest.raises(PlanError, match="joined"):
        plan_layout(plan([(0, 10), (10, 20), (20, 30)]), hosts, 30)
    with pytest.raises(PlanError, match="do not cover"):  # an empty stage
        plan_layout(plan([(0, 10), (10, 10), (10, 30)]), {**hosts, "h2": host("h2", None)}, 30)


def test_a_plan_that_its_hosts_cannot_load_is_refused_before_any_load():
    hosts = {"h0": host("h0", None), "h1": host("h1", None)}
    with pytest.raises(PlanError, match="for each of its 10 layers"):
        plan_layout(plan([(0, 10), (10, 30)], ["int8"] * 3), hosts, 30)
    with pytest.raises(PlanError, match="for each of its"):
        plan_layout(plan([(0, 15), (15, 30)], ["int3"] * 15), hosts, 30)
    big = replace(plan([(0, 10), (10, 30)]), stages=[replace(st, memory_bytes=5 << 30)
                                                    for st in plan([(0, 10), (10, 30)]).stages])
    with pytest.raises(PlanError, match="needs 5.00 GiB, the host offers 4.00 GiB"):
        plan_layout(big, hosts, 30)
    with pytest.raises(PlanError, match="no stages"):
        plan_layout(replace(big, stages=[]), hosts, 30)


def test_the_layout_is_the_plans_until_its_hosts_are_gone_after_serving():
    shape = ModelShape(30, 10 << 20, 20 << 20, 20 << 20, 4096)
    hosts = {"h0": host("h0", None), "h1": host("h1", None)}
    live = list(hosts.values())
    args = (hosts, live, shape, 30, SETTINGS.limits)
    order, ranges, _ = choose_layout(plan([(0, 5), (5, 30)]), False, True, *args)
    assert ranges == [(0, 5), (5, 30)]  # the plan's, not a memory split
    # once serving, a --plan host that died: split by memory over the live ones
    order, ranges, precisions = choose_layout(plan([(0, 5), (5, 30)]), False, True, hosts, live[:1], shape, 30,
                                              SETTINGS.limits)
    assert [h.name for h in order] == ["h0"] and ranges == [(0, 30)] and precisions == [[]]
    # before serving (or planned live) the plan must fit: its hosts not joined is an error
    with pytest.raises(PlanError, match="joined"):
        choose_layout(plan([(0, 5), (5, 30)]), False, False, {"h0": hosts["h0"]}, live[:1], shape, 30,
                      SETTINGS.limits)
    order, ranges, _ = choose_layout(None, False, False, *args)  # no plan: split by memory
    assert [h.name for h in order] == ["h0", "h1"] and ranges[0][0] == 0 and ranges[-1][1] == 30


def test_hosts_a_memory_split_cannot_use_are_left_out_not_fatal():
    """A host too small for one layer, or one more than there are layers, joining a serving cluster
    failed the whole layout: the cluster went degraded and refused every request."""
    shape = ModelShape(30, 10 << 20, 20 << 20, 20 << 20, 4096)
    hosts = {n: host(n, None) for n in ("h0", "h1", "tiny")}
    hosts["tiny"].inventory = replace(INVENTORY, usable_bytes=1 << 20)
    order, ranges, _ = choose_layout(None, False, True, hosts, list(hosts.values()), shape, 30, SETTINGS.limits)
    assert [h.name for h in order] == ["h0", "h1"] and ranges[-1][1] == 30
    many = [host(f"h{i:02d}", None) for i in range(31)]
    order, ranges, _ = choose_layout(None, False, True, {h.name: h for h in many}, many, shape, 30, SETTINGS.limits)
    assert len(order) == 30 and ranges == [(i, i + 1) for i in range(30)]
    with pytest.raises(PlanError, match="offer"):  # none fits at all: the full set's reason
        choose_layout(None, False, True, {"tiny": hosts["tiny"]}, [hosts["tiny"]], shape, 30, SETTINGS.limits)


def test_each_stage_is_told_its_neighbours_and_the_leader_closes_the_ring():
    a, b, c = (host(n, None) for n in "abc")
    a.data_addr, b.data_addr, c.data_addr = "tcp://a:1", "tcp://b:1", "tcp://c:1"
    a.public_key, b.public_key, c.public_key = "ka", "kb", "kc"
    layout = [a, b, c], [(0, 10), (10, 20), (20, 30)], [["native"] * 10, ["w8a8"] + ["int8"] * 9, []]
    scales = [{"x": float(i)} for i in range(30)]
    assigns = stage_assigns(layout, SETTINGS, 30, "hash", 7, "tcp://leader:9", ["w0", "w1", "w2"], "kl", scales)
    assert [(x.stage, x.num_stages, x.start, x.end) for x in assigns] == [(0, 3, 0, 10), (1, 3, 10, 20), (2, 3, 20, 30)]
    assert [x.downstream for x in assigns] == ["tcp://b:1", "tcp://c:1", "tcp://leader:9"]
    assert [(x.upstream_key, x.downstream_key) for x in assigns] == [("kl", "kb"), ("ka", "kc"), ("kb", "kl")]
    assert [x.weights_addr for x in assigns] == ["w0", "w1", "w2"] and {x.epoch for x in assigns} == {7}
    # only activation-quantized layers carry their input scales
    assert assigns[1].input_scales == [{"x": 10.0}] + [{}] * 9 and assigns[0].input_scales == [{}] * 10
    assert all((x.max_seqs, x.max_context, x.model_hash) == (4, 256, "hash") for x in assigns)
