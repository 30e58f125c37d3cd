"""Profiling (plan/profile.py): timing in turns, and within a time budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hetserve.plan.device_profile import Grid
from hetserve.plan import profile
from hetserve.plan.profile import measure_profile


def test_precisions_past_the_budget_are_left_out(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    grids = (Grid([1], [8]), Grid([1], [16]))
    full = measure_profile(tmp_path, precisions=["native", "int8"], repeats=1, progress=False, grids=grids)
    assert set(full.layer_bytes) == {"native", "int8"}
    short = measure_profile(tmp_path, precisions=["native", "int8"], repeats=1, progress=False, grids=grids,
                            budget_s=1e-9)
    assert set(short.layer_bytes) == {"native"}, "native is always measured; int8 would end past the budget"
    assert set(short.layer_ms["decode"]) == {"native"}


def test_timed_functions_take_turns_and_the_fastest_run_counts(monkeypatch):
    """Two functions measured together run in turn, so a busy spell of the machine slows both,
    and each gets the minimum of its own runs (a fake clock: each run advances it by its cost)."""
    clock = [0.0]
    monkeypatch.setattr(profile, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    order = []

    def timed(name, costs_ms):
        costs = iter(costs_ms)

        def run():
            order.append(name)
            clock[0] += next(costs) / 1000
        return run

    one = timed("one", [9, 9, 9, 5.0, 4.0, 6.0])  # three warm-ups, then three timed runs
    three = timed("three", [9, 9, 9, 12.0, 13.0, 11.0])
    fastest = profile._fastest_ms([one, three], torch.device("cpu"), repeats=3)
    assert order == ["one", "three"] * 6
    assert fastest == pytest.approx([4.0, 11.0])


def test_a_profile_of_older_code_is_not_reused(tmp_path, monkeypatch):
    """CPU profiles were keyed by library versions alone: one timed before the CPU linears of ours
    (1.9x faster decode) or the profiler's own change was planned with as if current."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    path = profile.profile_path(tmp_path, torch.device("cpu"), "float32")
    assert profile.profile_path(tmp_path, torch.device("cpu"), "float32") == path
    monkeypatch.setattr(profile, "PROFILE_FORMAT", profile.PROFILE_FORMAT + 1)
    assert profile.profile_path(tmp_path, torch.device("cpu"), "float32") != path


def test_a_profile_that_cannot_be_planned_with_is_refused_and_its_host_left_out():
    """The codec checks a profile's types only: a repeated grid point divided by zero in the
    planner, a short table raised IndexError, a NaN time made the host look free; the leader's
    whole layout failed with them. Such a profile is refused, and its host planned without."""
    import asyncio
    from dataclasses import replace

    from hetserve.config import LeaderSettings
    from hetserve.leader.daemon import Leader
    from hetserve.leader.hosts import HostRecord
    from hetserve.plan.device_profile import DeviceProfile
    from hetserve.plan.offline import REFERENCE_DIR
    from hetserve.wire.messages import Inventory

    good = DeviceProfile.load(REFERENCE_DIR / "cpu-2t-smollm2-135m-fp32.json")
    native = good.layer_ms["decode"]["native"]
    bad = {
        "increasing": replace(good, decode=Grid([1, 1, 8], good.decode.tokens)),
        "not 3 x 2": replace(good, layer_ms={**good.layer_ms, "decode": {**good.layer_ms["decode"],
                                                                         "native": native[:2]}}),
        "finite": replace(good, layer_ms={**good.layer_ms, "decode": {**good.layer_ms["decode"],
                                                                      "native": [[float("nan")] * 2] * 3}}),
        "head_ms needs": replace(good, head_ms={"prefill": good.head_ms["prefill"]}),
        "each precision": replace(good, layer_bytes={**good.layer_bytes, "fp8": 1}),
    }
    for why, broken in bad.items():
        with pytest.raises(ValueError, match=why):
            broken.check()

    leader = Leader(LeaderSettings(listen="127.0.0.1:5555"))
    leader.state = "serving"  # nothing new to lay out: only the bookkeeping is under test
    inventory = Inventory("cpu", "cpu", "x86", 8 << 30, 4 << 30, 4 << 30, 50.0, 2)
    host = HostRecord("h0", b"h0", "127.0.0.1", inventory, "tcp://127.0.0.1:1", 0.0, "float32", planned=True)
    leader.hosts["h0"] = host
    asyncio.run(leader._profile_arrived(host, bad["finite"]))
    assert host.profile is None and "h0" in leader.excluded and "malformed profile" in host.note
    asyncio.run(leader._profile_arrived(host, good))
    assert host.profile is good
