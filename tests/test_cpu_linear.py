"""CPU linears (model/cpu_linear.py): every way computes F.linear, the selector keeps the fastest
way it measured, and a stage's projections take this path on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve.model import cpu_linear
from hetserve.model.cpu_linear import SAMPLES, CpuLinear, Selector, adopt, bucket

MODE_AT_IMPORT = cpu_linear._PINNED  # what stages run (the fixture below switches to measuring per test)


@pytest.fixture(autouse=True)
def fresh_selectors(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_SELECTORS", {})
    monkeypatch.setattr(cpu_linear, "_PINNED", None)  # measuring; each test's changes undone after it


def test_stages_run_the_rule_by_default():
    assert MODE_AT_IMPORT == cpu_linear.RULE
    assert cpu_linear.DEFAULT_WAY == ("onednn" if torch.backends.mkldnn.is_available() else "mkl")


@pytest.mark.parametrize("rows, k, dtype, way", [
    (1, 576, torch.float32, "transposed"), (4, 576, torch.float32, "transposed"), (2, 1536, torch.float32, "transposed"),
    (8, 576, torch.float32, None), (4, 1536, torch.float32, None), (1, 4096, torch.float32, None),
    (1, 576, torch.bfloat16, None)])
def test_the_rule_runs_small_float32_products_transposed(rows, k, dtype, way):
    assert cpu_linear.rule_way(rows, k, dtype) == (way or cpu_linear.DEFAULT_WAY)


def test_a_host_sets_where_the_rule_transposes(monkeypatch):
    monkeypatch.setattr(cpu_linear, "SMALL_X", cpu_linear.SMALL_X)  # restored after the test
    cpu_linear.transpose_up_to(8192)  # hetserve join --cpu-transposed-up-to 8192
    assert cpu_linear.rule_way(8, 1024, torch.float32) == "transposed"
    cpu_linear.transpose_up_to(0)
    assert cpu_linear.rule_way(1, 1, torch.float32) == cpu_linear.DEFAULT_WAY
    with pytest.raises(ValueError, match=">= 0, not -1"):
        cpu_linear.transpose_up_to(-1)


def counting(name: str, calls: list):
    """WAYS[name], recording (name, rows) of each call in `calls`."""
    way = cpu_linear.WAYS[name]

    def counted(x, weight, bias):
        calls.append((name, x.shape[0]))
        return way(x, weight, bias)
    return counted


def test_the_rule_serves_by_the_shape_of_x(monkeypatch):
    calls = []
    for name in ("transposed", cpu_linear.DEFAULT_WAY):
        monkeypatch.setitem(cpu_linear.WAYS, name, counting(name, calls))
    module = torch.nn.Linear(576, 8)
    adopt([module])
    cpu_linear.pin(cpu_linear.RULE)
    with torch.no_grad():
        for rows in (1, 5, 6):
            torch.testing.assert_close(module(torch.ones(rows, 576)), F.linear(torch.ones(rows, 576), module.weight,
                                                                              module.bias))
    assert calls == [("transposed", 1), ("transposed", 5), (cpu_linear.DEFAULT_WAY, 6)]
    assert not cpu_linear._SELECTORS


def available_ways() -> list[str]:
    return [w for w in cpu_linear.WAYS if w != "onednn" or torch.backends.mkldnn.is_available()]


@pytest.mark.parametrize("way", ["mkl", "onednn", "transposed"])
@pytest.mark.parametrize("rows", [1, 2, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_every_way_computes_the_linear(way, rows, bias):
    if way not in available_ways():
        pytest.skip("oneDNN is not in this torch build")
    torch.manual_seed(rows)
    weight = torch.randn(96, 40)
    b = torch.randn(96) if bias else None
    x = torch.randn(rows, 40)
    out = cpu_linear.WAYS[way](x, weight, b)
    assert out.shape == (rows, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_buckets_are_powers_of_two():
    assert [bucket(r) for r in (0, 1, 2, 3, 4, 5, 8, 9, 100)] == [0, 1, 2, 4, 4, 8, 8, 16, 128]
    assert bucket(10 ** 6) == cpu_linear.MAX_BUCKET


def test_selector_tries_each_way_in_turn_then_keeps_the_fastest_median():
    selector = Selector(["a", "b", "c"])
    times = {"a": [3.0, 3.0, 1.0], "b": [2.0, 2.0, 9.0], "c": [5.0, 5.0, 5.0]}  # b has the lowest median
    tried = []
    for i in range(3 * SAMPLES):
        way = selector.next_way()
        tried.append(way)
        assert selector.chosen is None
        selector.record(way, times[way][i % 3 if way == "a" else (i // 3) % 3])
    assert sorted(tried) == sorted(["a", "b", "c"] * SAMPLES)
    assert tried[:3] == ["a", "b", "c"]  # round robin, not one way SAMPLES times first
    assert selector.chosen == "b"
    assert selector.next_way() == "b"


def test_selector_without_a_failed_way():
    selector = Selector(["a", "b"])
    selector.drop("a")
    assert selector.chosen == "b"


def test_cpu_linear_matches_nn_linear_while_choosing_and_after(monkeypatch):
    torch.manual_seed(0)
    reference = torch.nn.Linear(32, 48)
    module = torch.nn.Linear(32, 48)
    module.load_state_dict(reference.state_dict())
    assert adopt([module, torch.nn.LayerNorm(4)]) == 1 and type(module) is CpuLinear
    x = torch.randn(3, 1, 32)  # [b, 1, H] as a decode step has it
    with torch.no_grad():
        for _ in range(len(available_ways()) * SAMPLES + 2):
            torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)
    (settled,) = cpu_linear.choices().items()
    assert settled[0] == "48x32 float32 +bias rows<=4" and settled[1] in available_ways()


def test_a_way_that_fails_is_dropped_and_the_call_still_answers(monkeypatch):
    def broken(x, weight, bias):
        raise RuntimeError("not for this dtype")

    monkeypatch.setattr(cpu_linear, "WAYS", {"mkl": cpu_linear.mkl, "broken": broken})
    module = torch.nn.Linear(8, 4, bias=False)
    adopt([module])
    x = torch.randn(2, 8)
    with torch.no_grad():
        outs = [module(x) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, F.linear(x, module.weight))
    (selector,) = cpu_linear._SELECTORS.values()
    assert selector.ways == ["mkl"] and selector.chosen == "mkl"


def test_cpu_stage_projections_and_head_choose_their_product(model_dir):
    from hetserve.model.stage import StageModel, StageSpec

    stage = StageModel(model_dir, StageSpec(28, 30, first=False, last=True, max_seqs=2, max_context=64), "cpu")
    assert type(stage.lm_head) is CpuLinear
    assert all(type(m) is CpuLinear for layer in stage.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear))
    assert stage.decode_layers is not None
    assert all(type(m) is CpuLinear for m in stage.decode_layers.linears())  # the fused q|k|v and gate|up too


def test_a_pinned_way_serves_every_product(monkeypatch):
    calls = []

    def counted(x, weight, bias):
        calls.append(x.shape[0])
        return cpu_linear.mkl(x, weight, bias)

    monkeypatch.setitem(cpu_linear.WAYS, "counted", counted)
    module = torch.nn.Linear(8, 4)
    adopt([module])
    cpu_linear.pin("counted")
    try:
        with torch.no_grad():
            out = module(torch.ones(2, 3, 8))
    finally:
        cpu_linear.pin(None)
    assert calls == [6] and out.shape == (2, 3, 4) and not cpu_linear._SELECTORS
    with pytest.raises(ValueError, match="unknown way 'fastest'"):
        cpu_linear.pin("fastest")
