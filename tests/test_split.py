"""The memory-proportional layer split."""

from __future__ import annotations

import pytest

from hetserve.plan.split import ModelShape, PlanError, memory_split, stage_bytes

MiB = 1 << 20
SHAPE = ModelShape(num_layers=30, layer_bytes=10 * MiB, embed_bytes=50 * MiB, head_bytes=50 * MiB,
                   kv_bytes_per_token=1000)


def test_equal_hosts_split_evenly():
    assert memory_split(SHAPE, [1 << 30] * 3, kv_tokens=0) == [(0, 10), (10, 20), (20, 30)]


def test_split_follows_memory():
    ranges = memory_split(SHAPE, [3 << 30, 1 << 30], kv_tokens=0)
    sizes = [e - s for s, e in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and ranges[0][1] == ranges[1][0]
    assert sizes[0] > 2 * sizes[1]


def test_every_host_gets_a_layer_and_fits():
    caps = [100 * MiB, 4 << 30, 100 * MiB]
    ranges = memory_split(SHAPE, caps, kv_tokens=100)
    assert all(e > s for s, e in ranges)
    for i, ((s, e), cap) in enumerate(zip(ranges, caps)):
        assert stage_bytes(SHAPE, e - s, i == 0, i == 2, 100) <= cap


def test_refusals_say_why():
    with pytest.raises(PlanError, match="the model with its KV cache needs"):
        memory_split(SHAPE, [100 * MiB, 100 * MiB], kv_tokens=0)
    with pytest.raises(PlanError, match="at most 30 hosts"):
        memory_split(SHAPE, [1 << 30] * 31, kv_tokens=0)
    with pytest.raises(PlanError, match="no hosts"):
        memory_split(SHAPE, [], kv_tokens=0)


def test_a_split_that_fits_is_found_where_proportional_rounding_overflows_a_host():
    """5 layers of 10 MiB over 30, 19 and 19 MiB: proportional rounding gives 2 + 2 + 1, and a
    host of 19 MiB cannot hold 2; 3 + 1 + 1 fits."""
    shape = ModelShape(num_layers=5, layer_bytes=10 * MiB, embed_bytes=0, head_bytes=0, kv_bytes_per_token=0)
    assert memory_split(shape, [30 * MiB, 19 * MiB, 19 * MiB], kv_tokens=0) == [(0, 3), (3, 4), (4, 5)]
    with pytest.raises(PlanError, match="hold 4 whole layers"):
        memory_split(shape, [29 * MiB, 19 * MiB, 19 * MiB], kv_tokens=0)
    with pytest.raises(PlanError, match="host 2 would need 10 MiB for one layer but offers 9 MiB"):
        memory_split(shape, [60 * MiB, 19 * MiB, 9 * MiB], kv_tokens=0)
