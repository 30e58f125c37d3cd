"""Lower bounds that let the partitioner's search discard partial plans early, all exact relaxations.

- RestTable: the least (weighted) sum of stage costs of hosts k.. covering layers [i, L) within q
  quality units, ignoring memory and the two maxima (or relaxing them with weights). With memory
  and maxima dropped it is a sum over layers of a per-(host, precision) cost, so a layer-by-layer
  DP over (host, quality) computes it for every (k, i, q) at once (numpy over hosts and quality).
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


class RestTable:
    """Least cost of finishing a plan, over the layer-by-layer DP below.

    Stage s costs P_s * (1 + mu_s) + D_s * (N + lam_s): with lam = mu = 0 that is W. Because
    b * max_s D_s >= sum_s lam_s D_s whenever lam >= 0 sums to b (and likewise for P and a), the
    weighted cost of a whole plan is a lower bound on its T: the Lagrangian relaxation of the two
    maxima, which dual.py tunes. Memory is ignored, so every stage cost is a sum over its layers.

    rest[k, i, q]: least cost of stages k..K-1 on layers [i, L) within q quality units, stage k
    starting at i (inf when impossible); rest[K, L] = 0.
    after[k, j, q]: least cost of layers [j, L) when layer j - 1 is on host k (whose constant is
    already paid): layer j stays on k, or host k + 1 starts at j.
    """

    def __init__(self, pos: list[Position], names: list[str], quality: list[dict[str, int]], budget: int,
                 lam: np.ndarray | None = None, mu: np.ndarray | None = None, keep_choices: bool = False):
        k_hosts, layers, width = len(pos), len(quality), budget + 1
        lam = np.zeros(k_hosts) if lam is None else lam
        mu = np.zeros(k_hosts) if mu is None else mu
        self.pre, self.dec = np.full((k_hosts, len(names)), INF), np.full((k_hosts, len(names)), INF)
        for k, p in enumerate(pos):
            for name, x, y in zip(p.precisions, p.pre, p.dec):
                self.pre[k, names.index(name)], self.dec[k, names.index(name)] = x, y
        tokens = pos[0].tokens
        w = self.pre * (1 + mu)[:, None] + self.dec * (tokens + lam)[:, None]
        base = (np.array([p.base_pre for p in pos]) * (1 + mu) + np.array([p.base_dec for p in pos]) * (tokens + lam))
        self.costs = np.array([[q[name] for name in names] for q in quality], dtype=int)
        rest = np.full((k_hosts + 1, layers + 1, width), INF)
        rest[k_hosts, layers] = 0.0
        after = np.full((k_hosts, layers + 1, width), INF)
        after[k_hosts - 1, layers] = 0.0
        self.choice = np.zeros((layers, k_hosts, width), dtype=np.intp) if keep_choices else None
        # padded[:, width + q] = after[:, i + 1, q] and inf below: column width + q - c is "q - c units
        # left after paying c", inf where that is negative (costs past the budget count as width).
        padded = np.full((k_hosts, 2 * width), INF)
        shifts = width + np.arange(width)[None, :] - np.minimum(self.costs, width)[:, :, None]
        for i in range(layers - 1, -1, -1):
            padded[:, width:] = after[:, i + 1]
            cand = padded[:, shifts[i]] + w[:, :, None]  # (host, precision, q)
            if keep_choices:
                self.choice[i] = cand.argmin(axis=1)
            here = cand.min(axis=1)  # layer i on host k (its stage's constant not counted)
            rest[:k_hosts, i] = here + base[:, None]
            after[:, i] = np.minimum(here, rest[1:, i])
        self.rest, self.after, self.lam, self.mu = rest, after, lam, mu

    def path(self, budget: int) -> list[tuple[int, int]]:
        """(host, precision index into names) of each layer in the relaxation's optimum from (0, 0)
        within budget (needs keep_choices); [] when there is none."""
        layers, k_hosts = self.choice.shape[0], self.rest.shape[0] - 1
        if self.rest[0, 0, budget] == INF:
            return []
        out, k, q = [], 0, budget
        for i in range(layers):
            t = int(self.choice[i, k, q])
            out.append((k, t))
            q -= int(self.costs[i, t])
            if i + 1 < layers and k + 1 < k_hosts and self.rest[k + 1, i + 1, q] <= self.after[k, i + 1, q]:
                k += 1
        return out


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
