"""Lower bounds that let the partitioner's search discard partial plans early, all exact relaxations.

- rest_table: the least weighted sum W = sum_s (P_s + N * D_s) of hosts k.. covering layers [i, L)
  within q quality units, ignoring memory and the two maxima. With memory and maxima dropped, W is
  a sum over layers of a per-(host, precision) cost, so a layer-by-layer DP over (host, quality)
  computes it for every (k, i, q) at once (numpy over hosts and quality).
- minimax_table: the least possible max_s P_s (or D_s) of hosts k.. covering [i, L), each layer at
  the host's fastest precision, each stage within the layer count its memory allows, quality
  ignored. Every complete plan's maximum is at least this, which makes "bound-raised maxima" exact:
  a partial plan's running maximum below the bound can be replaced by the bound (the final maximum
  is the same), so partial plans that differ only below the bound collapse into one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .positions import Position

INF = math.inf


def rest_table(pos: list[Position], names: list[str], quality: list[dict[str, int]], budget: int) -> np.ndarray:
    """R[k, i, q]: least W of stages k..K-1 on layers [i, L) using at most q quality units (inf
    when impossible); R[K, L, :] = 0. Shape (K + 1, L + 1, budget + 1)."""
    k_hosts, layers, width = len(pos), len(quality), budget + 1
    w = np.full((k_hosts, len(names)), INF)
    for k, p in enumerate(pos):
        for name, cost in zip(p.precisions, p.w):
            w[k, names.index(name)] = cost
    base = np.array([p.base_w for p in pos])[:, None]
    rest = np.full((k_hosts + 1, layers + 1, width), INF)
    rest[k_hosts, layers] = 0.0
    # after[k]: least cost of the layers after the current one, given the current one is on host k.
    after = np.full((k_hosts, width), INF)
    after[k_hosts - 1] = 0.0
    for i in range(layers - 1, -1, -1):
        here = np.full((k_hosts, width), INF)  # layer i on host k (its stage's constant not counted)
        for t, name in enumerate(names):
            c = quality[i][name]
            if c < width:
                np.minimum(here[:, c:], after[:, :width - c] + w[:, t:t + 1], out=here[:, c:])
        rest[:k_hosts, i] = here + base
        after = np.minimum(here, rest[1:, i])  # layer i-1 on host k: then layer i on k, or k+1 starts at i
    return rest


def minimax_table(pos: list[Position], per_layer: list[float], base: list[float], layers: int) -> list[list[float]]:
    """M[k][i]: least max over stages k.. of base_k + n_k * per_layer_k covering [i, L), every host
    at least one layer and at most its memory's count (inf when impossible); M[K][L] = 0."""
    k_hosts = len(pos)
    table = [[INF] * (layers + 1) for _ in range(k_hosts + 1)]
    table[k_hosts][layers] = 0.0
    for k in range(k_hosts - 1, -1, -1):
        most, nxt, row = pos[k].max_layers(), table[k + 1], table[k]
        later = k_hosts - k - 1
        for i in range(layers - later - 1, -1, -1):
            best = INF
            for j in range(i + 1, min(i + most, layers - later) + 1):
                here = base[k] + (j - i) * per_layer[k]
                if here >= best:
                    break  # longer stages only cost more
                v = here if here > nxt[j] else nxt[j]
                if v < best:
                    best = v
            row[i] = best
    return table


def maxima_tables(pos: list[Position], layers: int) -> tuple[list[list[float]], list[list[float]]]:
    """(minimax of P, minimax of D); a host with no usable precision makes every entry inf."""
    fastest_pre = [min(p.pre) if p.pre else INF for p in pos]
    fastest_dec = [min(p.dec) if p.dec else INF for p in pos]
    return (minimax_table(pos, fastest_pre, [p.base_pre for p in pos], layers),
            minimax_table(pos, fastest_dec, [p.base_dec for p in pos], layers))
