"""The planner: pure planning on synthetic profiles, and plan -> serve end to end on SmolLM2."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from conftest import Cluster, connect, hetserve_cmd
from hetserve.plan.cost import CostModel, interpolate
from hetserve.plan.partition import partition
from hetserve.plan.planner import (HostInput, PlanningError, Workload, decode_microbatch, default_precisions,
                                   host_costs, host_orders, make_plan, objective_for, order_search, prefill_sizes,
                                   quality_units)
from hetserve.plan.device_profile import DeviceProfile, Grid
from hetserve.plan.split import contiguous_split
from hetserve.plan.quality import Sensitivity

MiB = 1 << 20
LAYERS = 8


def synthetic_profile(name: str, speed: float, int8_speedup: float = 1.0) -> DeviceProfile:
    grid_p, grid_d = Grid([1, 4], [32, 128]), Grid([1, 8], [64, 512])

    def table(base: float, grid: Grid) -> list[list[float]]:
        return [[base * speed * b * (t / grid.tokens[0]) ** 0.5 for t in grid.tokens] for b in grid.batches]

    return DeviceProfile(
        device="cpu", device_name=name, model="m", dtype="float32", versions={}, hidden_size=64,
        kv_bytes_per_token=512, embed_bytes=4 * MiB, head_bytes=4 * MiB,
        layer_bytes={"native": 10 * MiB, "int8": 3 * MiB, "int4": 2 * MiB},
        prefill=grid_p, decode=grid_d,
        layer_ms={"prefill": {"native": table(1.0, grid_p), "int8": table(1.2, grid_p), "int4": table(1.5, grid_p)},
                  "decode": {"native": table(0.3, grid_d), "int8": table(0.3 / int8_speedup, grid_d),
                             "int4": table(0.25, grid_d)}},
        fixed_ms={"prefill": [[0.1, 0.1], [0.1, 0.1]], "decode": [[0.05, 0.05], [0.05, 0.05]]},
        head_ms={"prefill": [0.5, 1.0], "decode": [0.5, 1.0]},
    )


SENS = Sensitivity("m", 256, math.log(20.0), {"int8": [0.001] * LAYERS, "int4": [0.004 * (i + 1) for i in range(LAYERS)]})


def test_interpolation_hits_grid_points_and_follows_power_laws():
    table = [[1.0, 4.0], [2.0, 8.0]]
    assert interpolate([1, 4], [32, 128], table, 1, 32) == pytest.approx(1.0)
    assert interpolate([1, 4], [32, 128], table, 4, 128) == pytest.approx(8.0)
    assert interpolate([1, 4], [32, 128], table, 2, 32) == pytest.approx(math.sqrt(2), rel=1e-3)
    assert interpolate([1, 4], [32, 128], table, 1, 256) == pytest.approx(8.0, rel=1e-3)  # power law beyond


def test_a_fixed_cost_measured_as_zero_does_not_explode():
    """Fixed costs went through the power-law interpolation: the CPU reference's prefill row
    [0, 2.88] ms made 60 600 ms for 8 prompts of 256 tokens (the layer itself: 37 ms), and
    0.03 ms half-way between 0 and 1 ms."""
    from hetserve.plan.cost import interpolate_held
    from hetserve.plan.device_profile import DeviceProfile
    from hetserve.plan.offline import REFERENCE_DIR

    cpu = DeviceProfile.load(REFERENCE_DIR / "cpu-2t-smollm2-135m-fp32.json")
    table = cpu.fixed_ms["prefill"]
    assert CostModel(cpu).fixed_ms("prefill", 8, 256) <= max(map(max, table))
    assert interpolate_held([1, 4], [32, 128], [[0.0, 1.0], [1.0, 1.0]], 1, 64) == pytest.approx(0.5)
    assert interpolate_held([1, 4], [32, 128], [[0.2, 1.0], [1.0, 3.0]], 100, 10_000) == 3.0  # held at the edge


def test_quality_units_round_up_and_ignore_negative_noise():
    sens = Sensitivity("m", 1, 1.0, {"int4": [0.009951, -0.5]})
    costs, budget = quality_units(sens, ["native", "int4"], math.expm1(0.01))  # budget = 0.01 loss in 200 units; 199.02 rounds up
    assert budget > 0 and costs[0]["int4"] == budget and costs[1]["int4"] == 0 and costs[0]["native"] == 0


def test_identical_hosts_are_ordered_once():
    prof = synthetic_profile("a", 1.0)
    hosts = [HostInput(f"h{i}", 100 * MiB, prof) for i in range(4)]
    assert [len(o) for o in host_orders(hosts)] == [4, 3, 2, 1]  # one order per subset size
    hosts.append(HostInput("big", 400 * MiB, prof))
    # subsets of size k: the big host in any of k places, or not there at all
    assert len(host_orders(hosts)) == 5 + (4 + 1) + (3 + 1) + (2 + 1) + (1 + 1)


def test_hosts_of_one_device_name_but_other_speeds_are_both_tried_in_each_place():
    """Every 2-thread x86 CPU is named alike: hosts are interchangeable only where all the planner
    reads of them is, so the plan must not depend on the order they are listed in."""
    slow = HostInput("slow", 200 * MiB, synthetic_profile("cpu-x86_64-2t", 2.0))
    fast = HostInput("fast", 200 * MiB, synthetic_profile("cpu-x86_64-2t", 0.1))
    far = HostInput("far", 200 * MiB, synthetic_profile("cpu-x86_64-2t", 0.1), link_ms=500.0)
    assert len(host_orders([slow, fast])) == 4  # both, each way, and each alone
    for hosts in ([slow, fast], [far, fast], [far, fast, slow]):
        one, other = (make_plan("m", h, SENS, Workload(64, 32, 4), 0.02) for h in (hosts, hosts[::-1]))
        assert one.predicted_tokens_per_s == pytest.approx(other.predicted_tokens_per_s), hosts
    assert [s.host for s in make_plan("m", [slow, fast], SENS, Workload(64, 32, 4), 0.02).stages] == ["fast"]


def test_layer_groups_count_negative_noise_as_zero():
    """Summed with their signs, one layer's negative (noise) delta hid its neighbour's cost and a
    grouped plan passed a target that its layers break."""
    from hetserve.plan.grouping import make_grouped_plan

    noisy = Sensitivity("m", 256, math.log(20.0), {"int8": [0.01, -0.01] * (LAYERS // 2), "int4": [1.0] * LAYERS})
    hosts = [HostInput("a", 200 * MiB, synthetic_profile("a", 1.0, int8_speedup=3.0))]
    plan = make_grouped_plan("m", hosts, noisy, Workload(64, 32, 4), 0.01, group=2)
    chosen = [p for stage in plan.stages for p in stage.precisions]
    assert noisy.predicted_ppl(chosen) <= noisy.base_ppl * 1.01 + 1e-9, chosen


def test_a_plan_of_native_layers_alone_needs_no_quantized_precision(model_dir, tmp_path, monkeypatch):
    """`hetserve plan --precisions native` (or profiles that left every quantized precision out):
    the sensitivity still says how many layers there are."""
    from hetserve.plan.grouping import make_grouped_plan
    from hetserve.plan.prior import depth_prior
    from hetserve.plan.quality import measure_sensitivity

    monkeypatch.setenv("HETSERVE_HOME", str(tmp_path))
    measured = measure_sensitivity(model_dir, [], tokens=16, progress=False)
    assert measured.delta == {"native": [0.0] * 30}
    assert depth_prior(SENS, 6, ["native"]).delta == {"native": [0.0] * 6}
    hosts = [HostInput("a", 400 * MiB, synthetic_profile("a", 1.0))]
    plan = make_grouped_plan("m", hosts, depth_prior(SENS, LAYERS, ["native"]), Workload(64, 32, 4), 0.02, ["native"])
    assert {p for stage in plan.stages for p in stage.precisions} == {"native"}


def test_a_host_that_does_not_pay_is_left_out():
    """A host 20x slower than the other, which fits the model alone, gets no layers."""
    hosts = [HostInput("fast", 200 * MiB, synthetic_profile("fast", 0.1)),
             HostInput("slow", 200 * MiB, synthetic_profile("slow", 2.0))]
    plan = make_plan("m", hosts, SENS, Workload(64, 32, 4), 0.02)
    assert [s.host for s in plan.stages] == ["fast"]


@pytest.mark.parametrize("target", [0.005, 0.02, 0.2])
def test_plans_respect_memory_and_quality(target):
    hosts = [HostInput("fast", 60 * MiB, synthetic_profile("fast", 0.5)),
             HostInput("slow", 40 * MiB, synthetic_profile("slow", 1.0))]
    plan = make_plan("m", hosts, SENS, Workload(64, 32, 4), target)
    precisions = [p for s in plan.stages for p in s.precisions]
    assert len(precisions) == LAYERS and plan.stages[0].start == 0 and plan.stages[-1].end == LAYERS
    assert all(s.memory_bytes <= s.capacity_bytes for s in plan.stages)
    assert SENS.predicted_ppl(precisions) <= plan.base_ppl * (1 + target) + 1e-9
    assert plan.predicted_tokens_per_s > 0
    for speed in plan.baselines.values():
        assert speed <= plan.predicted_tokens_per_s + 1e-6  # the optimum is never beaten by a baseline


def test_baselines_with_more_hosts_than_layers_split_only_real_layers():
    """An even split of 8 layers over 10 hosts used to give the last hosts slices past the model
    (one of minus one layer), and a baseline faster than the optimum."""
    hosts = [HostInput(f"h{i}", (20 + i) * MiB, synthetic_profile(f"h{i}", 0.5 + 0.1 * i)) for i in range(LAYERS + 2)]
    plan = make_plan("m", hosts, SENS, Workload(64, 32, 4), 0.02)
    assert plan.baselines and all(0 < speed <= plan.predicted_tokens_per_s + 1e-6 for speed in plan.baselines.values())
    with pytest.raises(ValueError, match="at least one"):
        contiguous_split(LAYERS, [1.0] * (LAYERS + 1))


def test_plan_uses_fast_precision_where_it_pays():
    """int8 decodes 3x faster on this device: a loose target quantizes, a zero target cannot."""
    hosts = [HostInput("a", 200 * MiB, synthetic_profile("gpu", 1.0, int8_speedup=3.0))]
    loose = make_plan("m", hosts, SENS, Workload(64, 128, 4), 0.5)
    assert loose.stages[0].precisions.count("int8") == LAYERS
    strict = make_plan("m", hosts, SENS, Workload(64, 128, 4), 0.0)
    assert set(strict.stages[0].precisions) == {"native"}
    assert loose.predicted_tokens_per_s > 1.5 * strict.predicted_tokens_per_s


def test_infeasible_names_the_nearest_target():
    hosts = [HostInput("small", 60 * MiB, synthetic_profile("s", 1.0))]  # native needs 88 MiB
    with pytest.raises(PlanningError, match="nearest feasible target"):
        make_plan("m", hosts, SENS, Workload(64, 32, 4), 0.0)
    with pytest.raises(PlanningError, match="does not fit"):
        make_plan("m", [HostInput("tiny", 5 * MiB, synthetic_profile("t", 1.0))], SENS, Workload(64, 32, 4), 1.0)
    # Hosts too small for a layer make every order of all the hosts infeasible; the plan without
    # them is what the nearest target is for (it said "does not fit at any precision"): every
    # order the search tries is tried for the message too.
    tiny = [HostInput(f"tiny{i}", 1 * MiB, synthetic_profile("t", 1.0)) for i in range(2)]
    with pytest.raises(PlanningError, match=r"nearest feasible target is \+1.0%"):
        make_plan("m", [hosts[0], *tiny], SENS, Workload(64, 32, 4), 0.0)


def three_hosts() -> list[HostInput]:
    return [HostInput("fast", 50 * MiB, synthetic_profile("fast", 0.4, int8_speedup=2.0)),
            HostInput("mid", 60 * MiB, synthetic_profile("mid", 0.7)),
            HostInput("slow", 120 * MiB, synthetic_profile("slow", 1.5, int8_speedup=1.5))]


def test_order_search_equals_solving_every_order_and_size():
    """Bound-ordered search with the incumbent as upper bound finds what solving every (order,
    prefill micro-batch) pair from scratch finds."""
    hosts, workload = three_hosts(), Workload(64, 32, 4)
    plan = make_plan("m", hosts, SENS, workload, 0.05)
    precisions = default_precisions(hosts)
    quality, budget = quality_units(SENS, precisions, 0.05)
    every = []
    for order in host_orders(hosts):
        d_mb = decode_microbatch(workload.batch, len(order))
        for p_mb in prefill_sizes(workload):
            got = partition([host_costs(h, precisions, workload, p_mb, d_mb) for h in order], LAYERS, precisions,
                            quality, budget, objective_for(workload, p_mb, len(order)))
            if got is not None:
                every.append(got.time_ms)
    want = workload.batch * workload.output_tokens / (min(every) / 1000)
    assert plan.predicted_tokens_per_s == pytest.approx(want, rel=1e-6)
    assert plan.optimality_gap == 0 and any("exact over all" in n for n in plan.notes)


def test_heuristic_orders_state_a_gap_that_bounds_the_exact_optimum():
    hosts, workload = three_hosts(), Workload(64, 32, 4)
    exact = make_plan("m", hosts, SENS, workload, 0.05)
    heuristic = make_plan("m", hosts, SENS, workload, 0.05, max_orders=0)
    assert any("order-free lower bound" in n and "%" in n for n in heuristic.notes)
    assert heuristic.optimality_gap >= 0
    # time is batch * tokens / speed: the bound T_heuristic / (1 + gap) is below the exact optimum.
    t_exact, t_heuristic = 1 / exact.predicted_tokens_per_s, 1 / heuristic.predicted_tokens_per_s
    assert t_heuristic >= t_exact * (1 - 1e-6)
    assert t_heuristic / (1 + heuristic.optimality_gap) <= t_exact * (1 + 1e-3)  # the gap is rounded


def test_the_heuristic_search_can_leave_hosts_out():
    """Past the exact search's limit only orders of every host were tried: more hosts than layers
    (or hosts too small to pay) made a plan that exists be refused as not fitting."""
    hosts = [HostInput(f"h{i}", 200 * MiB + i, synthetic_profile("a", 1.0)) for i in range(LAYERS + 1)]
    plan = make_plan("m", hosts, SENS, Workload(64, 32, 4), 0.02)  # all distinct: past 120 orders
    assert 1 <= len(plan.stages) <= LAYERS and any("heuristic" in n for n in plan.notes)


def test_alike_hosts_are_searched_exactly_however_many():
    """Distinct orders were found by examining every permutation, and 8! of them was the limit:
    8 alike hosts (8 distinct orders) fell to the heuristic and its stated gap."""
    alike = [HostInput(f"h{i}", 200 * MiB, synthetic_profile("a", 1.0)) for i in range(9)]
    orders, exact = order_search(alike)
    assert exact and [len(o) for o in orders] == list(range(9, 0, -1))
    odd = alike[:7] + [HostInput("x", 300 * MiB, synthetic_profile("b", 0.5))]
    orders, exact = order_search(odd)
    assert exact and len(orders) == sum(k + 1 for k in range(8)) + 7  # x at any of k + 1 places among k alike, or not


def test_cost_model_reads_the_profile():
    cost = CostModel(synthetic_profile("a", 1.0))
    assert cost.layer_ms("native", "decode", 1, 64) == pytest.approx(0.3)
    assert cost.layer_ms("int4", "prefill", 4, 32) == pytest.approx(6.0)
    assert cost.head_ms("decode", 8) == pytest.approx(1.0)


def test_plan_then_serve_mixed_precision(model_dir, tmp_path):
    """`hetserve plan` on this CPU, then `hetserve up --plan`: the pipeline loads the planned
    precisions and its greedy tokens equal the same precisions run in one process."""
    plan_file = tmp_path / "plan.json"
    done = subprocess.run(hetserve_cmd() + ["plan", "--host", "worker-0=400MiB", "--host", "worker-1=200MiB",
                                            "--prompt", "64", "--output", "32", "--batch", "2",
                                            "--max-ppl-increase", "5%", "--calibration-tokens", "128",
                                            "--out", str(plan_file), "--verify", "--show", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "verify: measured perplexity" in done.stdout and "(within the target)" in done.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads(plan_file.read_text())
    precisions = [p for s in plan["stages"] for p in s["precisions"]]
    assert len(precisions) == 30 and set(precisions) - {"native"}, "the memory needs some quantized layers"

    cluster = Cluster(2, "--plan", str(plan_file))
    try:
        import asyncio

        async def run():
            client = await connect(cluster)
            status = await client.status()
            events = await client.call({"prompt": "The capital of France is", "max_tokens": 12})
            await client.close()
            return status, [e["token_id"] for e in events if e["event"] == "token"]

        status, ids = asyncio.run(run())
    finally:
        assert cluster.stop() == 0
    assert [h["name"] for h in status["hosts"]] == sorted(s["host"] for s in plan["stages"])
    by_name = {h["name"]: h for h in status["hosts"]}
    for stage in plan["stages"]:
        assert by_name[stage["host"]]["layers"] == [stage["start"], stage["end"]]
        if set(stage["precisions"]) != {"native"}:
            assert "x" in by_name[stage["host"]]["precision"]  # e.g. "float32 x2, int8 x9"

    from transformers import AutoTokenizer

    from hetserve.model.stage import StageModel, StageSpec
    from hetserve.plan.quality import activation_scales

    whole = StageModel(model_dir, StageSpec(0, 30, True, True, max_seqs=1, max_context=64,
                                            precisions=tuple(precisions),
                                            input_scales=tuple(activation_scales(model_dir))))
    prompt = AutoTokenizer.from_pretrained(model_dir)("The capital of France is")["input_ids"]
    want = [int(whole.forward(torch.tensor([0]), torch.tensor([0]), torch.tensor([len(prompt)]),
                              torch.tensor([prompt]))[0])]
    while len(want) < 12:
        want.append(int(whole.forward(torch.tensor([0]), torch.tensor([len(prompt) + len(want) - 1]),
                                      torch.tensor([1]), torch.tensor([[want[-1]]]))[0]))
    eos = 2
    assert ids == (want[: want.index(eos) + 1] if eos in want else want)


def test_leader_plans_live_from_joined_hosts_profiles(model_dir, tmp_path):
    """Hosts send their profiles on request; the leader plans under the target and serves."""
    import asyncio

    plan_file = tmp_path / "live.json"
    cluster = Cluster(2, "--memory", "300MiB", "--max-ppl-increase", "5%", "--calibration-tokens", "128",
                      "--plan-prompt", "64", "--plan-output", "32", "--plan-batch", "2", "--plan-out", str(plan_file))
    try:
        async def run():
            client = await connect(cluster, timeout=600)
            status = await client.status()
            done = (await client.call({"prompt": "Hello, my name is", "max_tokens": 8}))[-1]
            await client.close()
            return status, done

        status, done = asyncio.run(run())
    finally:
        assert cluster.stop() == 0
    assert done["event"] == "done" and done["usage"]["completion_tokens"] >= 1
    plan = json.loads(plan_file.read_text())
    assert status["plan"]["predicted_ppl"] <= status["plan"]["base_ppl"] * 1.05 + 1e-9
    # The plan's prompts per prefill micro-batch within the operator's bound; decode as the scheduler
    # splits the running requests (the plan's ceil(batch / stages)), bounded by --decode-seqs alone.
    assert status["limits"]["prefill_seqs"] == min(4, plan["prefill_microbatch"])
    assert status["limits"]["decode_seqs"] == 8
    layers = {h["name"]: h["layers"] for h in status["hosts"]}
    assert layers == {s["host"]: [s["start"], s["end"]] for s in plan["stages"]}
    assert any("x" in h["precision"] for h in status["hosts"]), "300 MiB per host needs quantized layers"


def test_omega_of_a_hand_made_layer_is_the_closed_form():
    """ω = s_w² · Var(x), s_w = (max W - min W) / (2^(b-1) - 1), MLP terms x4, summed per layer."""
    from hetserve.plan.omega import Omega, collect_stats, layer_omega

    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
    layer.self_attn.q_proj = torch.nn.Linear(2, 2, bias=False)
    layer.mlp.up_proj = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.self_attn.q_proj.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))  # range 5
        layer.mlp.up_proj.weight.copy_(torch.tensor([[0.25, -0.75]]))  # range 1
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # population variance 1.25
    y = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # population variance 1.0
    stats = collect_stats(torch.nn.ModuleList([layer]), lambda: (layer.self_attn.q_proj(x), layer.mlp.up_proj(y)))
    (linears,) = stats
    assert [(s.name, s.ffn) for s in linears] == [("self_attn.q_proj", False), ("mlp.up_proj", True)]
    assert linears[0].weight_range == pytest.approx(5.0) and linears[0].input_var == pytest.approx(1.25)
    assert layer_omega(linears, 8) == pytest.approx((5 / 127) ** 2 * 1.25 + 4 * (1 / 127) ** 2 * 1.0)
    assert layer_omega(linears, 4) == pytest.approx((5 / 7) ** 2 * 1.25 + 4 * (1 / 7) ** 2 * 1.0)
    om = Omega("m", 2, {"int8": [1.0, 2.0], "int4": [10.0, 20.0], "w8a8": [1.0, 2.0]})
    assert om.total(["native", "int4"]) == 20.0 and om.total(["w8a8", "int8"]) == 3.0


def test_quality_caches_tell_a_fine_tune_from_its_base(tmp_path):
    """Sensitivity and w8a8 scales were cached by config.json alone: a fine-tune of the same
    config reused its base model's (scales shipped to its stages included)."""
    from hetserve.plan.quality import model_key, quality_key

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for d, weights in ((base, b"\0" * 64), (tuned, b"\1" * 80)):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
        (d / "model.safetensors").write_bytes(weights)
    assert model_key(base) == model_key(tuned), "the same shape: one speed profile serves both"
    assert quality_key(base) != quality_key(tuned)
