"""Small running statistics shared by the leader and the hosts."""

from __future__ import annotations

EMA_WEIGHT = 0.2  # weight of the newest sample: about the last 5 samples dominate


def ema(old: float, new: float) -> float:
    """Exponential moving average; the first sample (old == 0) is taken as is."""
    return new if not old else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new
