"""The leader's pure layout pieces (leader/layout.py): adoption after a restart and plan checks."""

from __future__ import annotations

import pytest

from hetserve.config import LeaderSettings, Limits
from hetserve.leader.hosts import HostRecord
from hetserve.leader.layout import adoptable, plan_layout
from hetserve.plan.planner import Plan, PlannedStage, Workload
from hetserve.plan.split import PlanError
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


def test_plan_layout_checks_hosts_and_coverage():
    def plan(bounds):
        stages = [PlannedStage(f"h{i}", a, b, [], 1.0, 1.0, 1, 2) for i, (a, b) in enumerate(bounds)]
        return Plan("m", "float32", Workload(), 0.02, 1.0, 1.0, stages, 1, 1, 1.0)

    hosts = {"h0": host("h0", None), "h1": host("h1", None)}
    order, ranges, _ = plan_layout(plan([(0, 10), (10, 30)]), hosts, 30)
    assert [h.name for h in order] == ["h0", "h1"] and ranges == [(0, 10), (10, 30)]
    with pytest.raises(PlanError, match="do not cover"):
        plan_layout(plan([(0, 10), (11, 30)]), hosts, 30)
    with pytest.raises(PlanError, match="joined"):
        plan_layout(plan([(0, 10), (10, 20), (20, 30)]), hosts, 30)
