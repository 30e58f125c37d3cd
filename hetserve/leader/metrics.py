"""Prometheus text exposition (format 0.0.4) of the leader's status: a pure function."""

from __future__ import annotations


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def sample_value(value) -> str:
    """Every digit: `:g` kept 6, so a counter past 10^6 moved in steps (rate() read 0, then jumps)."""
    if isinstance(value, (bool, int)):
        return str(int(value))
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {sample_value(value)}")


def render_metrics(status: dict) -> str:
    w = _Writer()
    w.metric("hetserve_up", "gauge", "1 when the cluster is serving.", [({"state": status["state"]}, status["state"] == "serving")])
    w.metric("hetserve_requests_running", "gauge", "Requests holding a KV slot.", [({}, status["running"])])
    w.metric("hetserve_requests_queued", "gauge", "Requests waiting for a KV slot.", [({}, status["queued"])])
    w.metric("hetserve_requests_finished_total", "counter", "Requests ended, by outcome.",
             [({"outcome": k}, v) for k, v in sorted(status["outcomes"].items())])
    w.metric("hetserve_generated_tokens_total", "counter", "Tokens generated.", [({}, status["generated_tokens"])])
    w.metric("hetserve_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
             [({}, status["tokens_per_s"])])
    w.metric("hetserve_microbatches_in_flight", "gauge", "Micro-batches in the pipeline.", [({}, status["in_flight"])])
    w.metric("hetserve_microbatch_rows", "gauge", "Moving average of requests per micro-batch, by phase.",
             [({"phase": p}, v) for p, v in status["batch_rows"].items()])
    limits = status["limits"]
    w.metric("hetserve_microbatch_rows_limit", "gauge", "Configured most requests per micro-batch, by phase.",
             [({"phase": "prefill"}, limits["prefill_seqs"]), ({"phase": "decode"}, limits["decode_seqs"])])
    batching = status["batching"]
    w.metric("hetserve_microbatches_in_flight_limit", "gauge", "Micro-batches in flight the leader allows now.",
             [({}, batching["max_in_flight"])])
    w.metric("hetserve_prefill_chunk_tokens", "gauge", "Most prompt tokens the leader puts in a prefill micro-batch now.",
             [({}, batching["prefill_tokens"])])
    w.metric("hetserve_mixed_microbatches_total", "counter", "Prefill micro-batches sent with decode rows riding in them.",
             [({}, batching["mixed_microbatches"])])
    w.metric("hetserve_decode_round_trip_seconds", "gauge", "Moving average of a decode micro-batch's send to result.",
             [({}, batching["decode_round_ms"] / 1000)])
    w.metric("hetserve_stage_step_seconds", "gauge", "Moving average of a stage's compute time per micro-batch.",
             [({"stage": i, "phase": p}, ms / 1000) for p, times in status["stage_ms"].items() for i, ms in enumerate(times)])
    w.metric("hetserve_kv_slots_free", "gauge", "Free KV-cache slots (same on every stage).", [({}, status["free_slots"])])
    capacity_tokens = limits["max_seqs"] * limits["max_context"]
    used = status["kv_tokens_used"] / capacity_tokens if capacity_tokens else 0.0
    hosts = status["hosts"]
    w.metric("hetserve_kv_cache_bytes", "gauge", "KV-cache memory a host holds.",
             [({"host": h["name"], "stage": h["stage"]}, h["kv_bytes"]) for h in hosts])
    w.metric("hetserve_kv_cache_used_bytes", "gauge", "KV-cache memory in use by running requests.",
             [({"host": h["name"], "stage": h["stage"]}, h["kv_bytes"] * used) for h in hosts])
    w.metric("hetserve_host_healthy", "gauge", "1 when the host was heard from in the last 3 s.",
             [({"host": h["name"], "stage": h["stage"]}, h["health"] == "ok") for h in hosts])
    w.metric("hetserve_host_last_seen_seconds", "gauge", "Seconds since the host was last heard from.",
             [({"host": h["name"]}, h["last_seen_s"]) for h in hosts])
    w.metric("hetserve_host_busy_seconds_total", "counter", "Seconds the host spent computing.",
             [({"host": h["name"]}, h["busy_s"]) for h in hosts])
    return "\n".join(w.lines) + "\n"
