"""A device profile as data: what `hetserve profile` measures, what a host sends the leader.

Registered as wire messages, so a profile crossing the control channel is validated field by
field like every other message (never unpickled).
"""

from __future__ import annotations

import json
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
        return cls(**data)
