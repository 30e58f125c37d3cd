"""Small running statistics shared by the leader and the hosts."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

EMA_WEIGHT = 0.2  # weight of the newest sample: about the last 5 samples dominate


def ema(old: float, new: float) -> float:
    """Exponential moving average; the first sample (old == 0) is taken as is."""
    return new if not old else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new


@dataclass
class PhaseTimes:
    """Exponential moving average of each stage's compute time per micro-batch (ms)."""

    stage_ms: list[float] = field(default_factory=list)
    rounds: int = 0

    def add(self, sample: list[float]) -> None:
        if len(self.stage_ms) != len(sample):
            self.stage_ms = list(sample)
        else:
            self.stage_ms = [ema(old, new) for old, new in zip(self.stage_ms, sample)]
        self.rounds += 1


class TokenRate:
    """Generated tokens per second over the last `window` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()  # (time, tokens generated so far)

    def add(self, total: int, now: float) -> None:
        self.samples.append((now, total))
        while len(self.samples) > 2 and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        if len(self.samples) < 2 or now - self.samples[-1][0] > self.window:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9) if t1 > t0 else 0.0
