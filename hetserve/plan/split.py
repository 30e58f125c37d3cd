"""Memory-proportional layer split: each host gets a contiguous range of decoder layers in
proportion to the memory it offers (after the embedding on the first host and the head on the
last). A pure function; the planner (profiled cost model + DP) will replace it."""

from __future__ import annotations

from dataclasses import dataclass


class PlanError(Exception):
    """No assignment satisfies the constraints; the message says which host lacks what."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    layer_bytes: int  # weights of one decoder layer at the serving dtype
    embed_bytes: int  # token embedding (first stage)
    head_bytes: int  # final norm + lm_head (last stage)
    kv_bytes_per_token: int  # K and V of one token in one layer


def stage_bytes(shape: ModelShape, layers: int, first: bool, last: bool, kv_tokens: int) -> int:
    return (layers * (shape.layer_bytes + kv_tokens * shape.kv_bytes_per_token)
            + (shape.embed_bytes if first else 0) + (shape.head_bytes if last else 0))


def contiguous_split(layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """[(start, end)] per weight, contiguous, covering all layers, each at least one layer, sizes in
    proportion to the weights; cumulative rounding keeps the total exact."""
    if len(weights) > layers:
        raise ValueError(f"{len(weights)} parts of {layers} layers: each needs at least one")
    total, bounds, acc = sum(weights), [0], 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        bounds.append(max(bounds[-1] + 1, min(round(layers * acc / total), layers - (len(weights) - 1 - i))))
    bounds.append(layers)
    return list(zip(bounds[:-1], bounds[1:]))


def memory_split(shape: ModelShape, capacities: list[int], kv_tokens: int) -> list[tuple[int, int]]:
    """capacities: usable bytes per host, in pipeline order. kv_tokens: slots x context.

    Returns [(start, end)] per host, contiguous, covering all layers, each at least one layer.
    """
    hosts = len(capacities)
    if hosts == 0:
        raise PlanError("no hosts")
    if hosts > shape.num_layers:
        raise PlanError(f"{hosts} hosts but only {shape.num_layers} layers: use at most {shape.num_layers} hosts")
    per_layer = shape.layer_bytes + kv_tokens * shape.kv_bytes_per_token
    budgets = [max(0, cap - stage_bytes(shape, 0, i == 0, i == hosts - 1, kv_tokens))
               for i, cap in enumerate(capacities)]
    total = sum(budgets)
    if total < per_layer * shape.num_layers:
        need = stage_bytes(shape, shape.num_layers, True, True, kv_tokens)
        raise PlanError(f"the hosts offer {sum(capacities) / 2**30:.2f} GiB together but the model with its "
                        f"KV cache needs {need / 2**30:.2f} GiB: add hosts, or lower --max-seqs/--max-context")
    for i, (budget, cap) in enumerate(zip(budgets, capacities)):
        if budget < per_layer:
            need = stage_bytes(shape, 1, i == 0, i == hosts - 1, kv_tokens)
            raise PlanError(f"host {i} would need {need / 2**20:.0f} MiB for one layer but offers {cap / 2**20:.0f} MiB")
    # Proportional sizes, each cut to the whole layers its host holds; what that leaves over goes,
    # a layer at a time, to the host with the most room left (proportional rounding alone refused
    # splits that fit: 5 layers of 10 MiB over 30 + 19 + 19 MiB rounded to 2 + 2 + 1).
    caps = [budget // per_layer for budget in budgets]
    sizes = [min(end - start, cap) for (start, end), cap in zip(contiguous_split(shape.num_layers, budgets), caps)]
    if sum(caps) < shape.num_layers:
        raise PlanError(f"the hosts hold {sum(caps)} whole layers with their KV cache, the model has "
                        f"{shape.num_layers}: add hosts, or lower --max-seqs/--max-context")
    while sum(sizes) < shape.num_layers:
        i = max((j for j in range(hosts) if sizes[j] < caps[j]), key=lambda j: budgets[j] - sizes[j] * per_layer)
        sizes[i] += 1
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:]))
