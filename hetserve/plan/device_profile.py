"""A device profile as data: what `hetserve profile` measures, what a host sends the leader.

Registered as wire messages, so a profile crossing the control channel is validated field by
field like every other message (never unpickled).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_atomic
from ..wire.codec import message


@message("grid")
@dataclass(frozen=True)
class Grid:
    batches: list[int]
    tokens: list[int]  # prompt length (prefill) or context length (decode)


@message("device_profile")
@dataclass(frozen=True)
class DeviceProfile:
    device: str  # e.g. "cpu" or "cuda:0"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3"
    model: str  # model key (config hash)
    dtype: str
    versions: dict[str, str]
    hidden_size: int
    kv_bytes_per_token: int  # K and V of one token in one layer
    embed_bytes: int
    head_bytes: int
    layer_bytes: dict[str, int]  # precision -> weight bytes of one decoder layer
    prefill: Grid
    decode: Grid
    layer_ms: dict[str, dict[str, list[list[float]]]]  # phase -> precision -> [batch][tokens]
    fixed_ms: dict[str, list[list[float]]]  # phase -> [batch][tokens]: per-step cost of a stage
    head_ms: dict[str, list[float]] = field(default_factory=dict)  # phase -> [batch]

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "DeviceProfile":
        data = json.loads(Path(path).read_text())
        data["prefill"], data["decode"] = Grid(**data["prefill"]), Grid(**data["decode"])
        profile = cls(**data)
        profile.check()
        return profile

    def check(self) -> None:
        """ValueError unless every table fits its grid and holds times a planner can use. The codec
        checks types only, and a profile comes from a host or a file: a repeated grid point divided
        by zero, a short table raised IndexError, a NaN time made the host look free."""
        phases = {"prefill": self.prefill, "decode": self.decode}
        for phase, grid in phases.items():
            for axis in (grid.batches, grid.tokens):
                if not axis or axis[0] < 1 or any(a >= b for a, b in zip(axis, axis[1:])):
                    raise ValueError(f"the {phase} grid {axis} must be increasing numbers >= 1")
        for name, tables in (("layer_ms", self.layer_ms), ("fixed_ms", self.fixed_ms), ("head_ms", self.head_ms)):
            if set(tables) != set(phases):
                raise ValueError(f"{name} needs a table for prefill and for decode, not {sorted(tables)}")
        if not self.layer_bytes or any(set(self.layer_ms[p]) != set(self.layer_bytes) for p in phases):
            raise ValueError(f"layer_ms must time each precision of layer_bytes ({sorted(self.layer_bytes)})")
        for phase, grid in phases.items():
            for name, table in [*self.layer_ms[phase].items(), ("fixed", self.fixed_ms[phase])]:
                if len(table) != len(grid.batches) or any(len(row) != len(grid.tokens) for row in table):
                    raise ValueError(f"the {phase} {name} table is not {len(grid.batches)} x {len(grid.tokens)}")
                _times(f"{phase} {name}", [v for row in table for v in row])
            if len(self.head_ms[phase]) != len(grid.batches):
                raise ValueError(f"the {phase} head_ms needs one time per batch size of its grid")
            _times(f"{phase} head", self.head_ms[phase])
        if min(self.hidden_size, self.kv_bytes_per_token, self.embed_bytes, self.head_bytes,
               *self.layer_bytes.values()) < 0:
            raise ValueError("sizes must be >= 0")


def _times(what: str, values: list[float]) -> None:
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{what} times must be finite and >= 0")
