"""A cluster file for offline planning: hosts by device kind, memory and link, and optionally the
workload to plan for (examples/clusters/*.toml).

    description = "LLM-PQ's OPT-66B cluster: 4 x T4 + 2 x V100-32G"
    link_gbps = 100          # default link of every host to the next stage
    link_ms = 0.05

    [workload]               # optional; the command line wins
    prompt = 512
    output = 100
    batch = 32

    [[host]]
    name = "t4"              # with count > 1: t4-0, t4-1, ...
    device = "T4"            # a kind of hetserve.plan.cost.DEVICE_SPECS
    count = 4
    memory_gib = 16          # optional: default the kind's memory
    link_gbps = 10           # optional: default the top-level one

Every error names the file and the key; parsing is a pure function of the text.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .cost import DEVICE_SPECS

GiB = 1 << 30
DEFAULT_LINK_GBPS = 10.0
DEFAULT_LINK_MS = 0.2
TOP_KEYS = {"description", "link_gbps", "link_ms", "workload", "host"}
HOST_KEYS = {"name", "device", "count", "memory_gib", "link_gbps", "link_ms"}
WORKLOAD_KEYS = {"prompt", "output", "batch"}


class ClusterError(ValueError):
    """A cluster file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ClusterHost:
    name: str
    device: str  # a DEVICE_SPECS kind
    memory_bytes: int
    link_gbps: float
    link_ms: float


@dataclass(frozen=True)
class Cluster:
    description: str
    hosts: tuple[ClusterHost, ...]
    workload: dict[str, int] = field(default_factory=dict)  # of prompt, output, batch: those the file sets


def _number(where: str, key: str, value, minimum: float, strict: bool) -> float:
    """A finite number above `minimum` (or at it, not strict): TOML has nan and inf, which pass < and ==."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ClusterError(f"{where}: {key} must be a number {bound}, not {value!r}")
    return float(value)


def _integer(where: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterError(f"{where}: {key} must be a whole number >= 1, not {value!r}")
    return value


def _unknown(where: str, table: dict, known: set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ClusterError(f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")


def parse_cluster(text: str, source: str = "<cluster>") -> Cluster:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClusterError(f"{source} is not valid TOML: {exc}") from None
    _unknown(source, data, TOP_KEYS)
    link_gbps = _number(source, "link_gbps", data.get("link_gbps", DEFAULT_LINK_GBPS), 0, True)
    link_ms = _number(source, "link_ms", data.get("link_ms", DEFAULT_LINK_MS), 0, False)
    workload = data.get("workload", {})
    if not isinstance(workload, dict):
        raise ClusterError(f"{source}: workload must be a table ([workload])")
    _unknown(f"{source} [workload]", workload, WORKLOAD_KEYS)
    workload = {k: _integer(f"{source} [workload]", k, v) for k, v in workload.items()}
    entries = data.get("host")
    if not isinstance(entries, list) or not entries:
        raise ClusterError(f"{source}: no hosts: add one [[host]] table per host (or per group, with count)")
    hosts: list[ClusterHost] = []
    for i, entry in enumerate(entries):
        where = f"{source} host #{i + 1}"
        if not isinstance(entry, dict):
            raise ClusterError(f"{where}: must be a table ([[host]])")
        _unknown(where, entry, HOST_KEYS)
        name, device = entry.get("name"), entry.get("device")
        if not isinstance(name, str) or not name:
            raise ClusterError(f"{where}: needs a name")
        where = f"{source} host {name!r}"
        if not isinstance(device, str) or device not in DEVICE_SPECS:
            raise ClusterError(f"{where}: unknown device {device!r}; known kinds: {', '.join(DEVICE_SPECS)}")
        count = _integer(where, "count", entry.get("count", 1))
        memory_gib = _number(where, "memory_gib", entry.get("memory_gib", DEVICE_SPECS[device].memory_gb), 0, True)
        host_gbps = _number(where, "link_gbps", entry.get("link_gbps", link_gbps), 0, True)
        host_ms = _number(where, "link_ms", entry.get("link_ms", link_ms), 0, False)
        names = [name] if count == 1 else [f"{name}-{j}" for j in range(count)]
        hosts += [ClusterHost(n, device, int(memory_gib * GiB), host_gbps, host_ms) for n in names]
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise ClusterError(f"{source}: two hosts are named {h.name!r}")
        seen.add(h.name)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ClusterError(f"{source}: description must be a string")
    return Cluster(description, tuple(hosts), workload)


def load_cluster(path: Path) -> Cluster:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ClusterError(f"cannot read {path}: {exc.strerror}") from None
    return parse_cluster(text, str(path))
