"""Link numbers from probe round trips (leader/link.py)."""

from hetserve.leader.link import link_from_round_trips


def test_latency_is_half_the_fastest_round_trip_and_bandwidth_the_payloads_extra_time():
    link = link_from_round_trips([0.0012, 0.0010, 0.0030], [0.0110, 0.0090], large_bytes=10_000_000)
    assert link.latency_ms == 0.5
    assert link.gbps == 10.0  # 80 Mbit in 8 ms beyond the round trip


def test_a_link_too_fast_to_see_is_capped_not_infinite():
    link = link_from_round_trips([0.002], [0.001], large_bytes=1000)
    assert 0 < link.gbps < float("inf")
