"""A stage's KV cache: one preallocated buffer per layer, a row ("slot") per running request.

transformers' own caches keep one write position for the whole batch, but continuous batching
puts requests at different positions in one micro-batch. A decoder layer only calls
`cache.update(key_states, value_states, layer_idx)` and then attends with the mask it was given,
so this object writes each row at its own request's positions and returns the keys and values of
the batch's slots; `StepLayout` builds the matching 4-D mask.

Slots belong to the leader: it hands a slot to a request at admission and takes it back when the
request ends. Stages never free anything. A reused slot's old entries are never attended to,
because a row only attends to positions its own request has written (the mask), and
micro-batches reach every stage in the order the leader sent them. They are still multiplied by
a weight of 0, and 0 * inf is NaN: a float16 cache (whose range a layer can overflow) stores
non-finite K/V as finite, so one request's overflow cannot poison the slot's next owners.
"""

from __future__ import annotations

import functools

import torch


class SlotKVCache:
    """keys[layer], values[layer]: [slots, kv_heads, max_context + 1, head_dim].

    The extra last column is scratch: padded token positions of a prefill chunk write there, so
    padding never overwrites a real entry and is never read (no sequence reaches that index).
    """

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int,
                 max_context: int, dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_context + 1, head_dim)
        # Zeroed, not empty: masked positions still enter attention's `weights @ values`
        # with weight 0, and 0 * NaN from uninitialised memory would poison the row.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = slots
        self.max_context = max_context
        self.scratch = max_context
        self.finite_only = dtype == torch.float16
        self._layout: StepLayout | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin(self, layout: "StepLayout") -> None:
        self._layout = layout

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """key_states, value_states: [B, kv_heads, T, head_dim] -> layer `layer_idx` of the rows' slots."""
        lay = self._layout
        if self.finite_only:
            key_states, value_states = torch.nan_to_num(key_states), torch.nan_to_num(value_states)
        # Indices on dims 0 and 2 around a slice: the indexed view is [B, T, kv_heads, head_dim].
        self.keys[layer_idx][lay.slot_rows, :, lay.write_pos] = key_states.transpose(1, 2)
        self.values[layer_idx][lay.slot_rows, :, lay.write_pos] = value_states.transpose(1, 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, T, head_dim] -> [B, kv_heads, L, head_dim]."""
        lay = self._layout
        self.write(key_states, value_states, layer_idx)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if lay.slot_run is not None:  # rows are consecutive slots: attend to them in place, no gather
            first, rows = lay.slot_run
            return keys[first:first + rows, :, : lay.kv_len], values[first:first + rows, :, : lay.kv_len]
        return (keys[:, :, : lay.kv_len].index_select(0, lay.slots),
                values[:, :, : lay.kv_len].index_select(0, lay.slots))


class StepLayout:
    """Where each row of one micro-batch sits in the cache, and what it may attend to.

    slots [B], starts [B] (tokens already cached), lengths [B] (new tokens; rows right-padded to
    T = max(lengths)). Derived: position_ids [B, T], write_pos [B, T] (padding -> scratch),
    mask [B, 1, T, L] with L = max(starts + lengths): query (b, t) sees keys 0..starts[b]+t
    (built on first use: attention that reads the cache in place needs none, nor does a `causal`
    layout).
    """

    def __init__(self, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scratch: int,
                 steps: int | None = None, kv_len: int | None = None, every_slot: bool = False,
                 shared_slots: bool = False):
        """steps, kv_len: fixed sizes for a static-shape step (a captured CUDA graph: no host sync,
        rows with length 0 are padding); None = the batch's own, read from the tensors.
        every_slot: the rows are all the cache's slots in order (slots = 0..S-1), so attention
        reads the cache where it lies instead of a gathered copy. shared_slots: rows may share a
        slot (a prefill step run as one row per prompt token), so every row's K/V is written
        before any row attends."""
        device = slots.device
        dynamic = steps is None and kv_len is None  # shapes read from the tensors (a host sync; never in a graph)
        steps = int(lengths.max()) if steps is None else steps
        t = torch.arange(steps, device=device)
        self.slots = slots
        self.starts = starts
        self.slot_rows = slots[:, None]
        self.shared_slots = shared_slots
        self.lengths = lengths
        positions = starts[:, None] + t[None, :]
        self._valid = t[None, :] < lengths[:, None]
        # Padding takes its row's first position, not one past the row's end: that could pass
        # the model's limit, and dynamic / longrope rotary scaling re-scales every row's
        # frequencies from the largest position it is given.
        self.position_ids = torch.where(self._valid, positions, starts[:, None])
        self.write_pos = torch.where(self._valid, positions, scratch)
        self.kv_len = int((starts + lengths).max()) if kv_len is None else kv_len
        # Every row starts at position 0 (whole prompts, first chunks): query t may see keys 0..t,
        # the plain causal mask, which attention applies without a mask tensor, skipping the
        # masked half of its work (and, in SDPA, without copying grouped K/V heads). Padded
        # queries then see keys past their row's end: garbage in rows nobody reads (their K/V
        # go to scratch). One-token steps keep the mask: SDPA applies no causal mask to them.
        self.causal = (dynamic and steps > 1 and not shared_slots and self.kv_len == steps
                       and not bool(starts.any()))
        # One token a row, each row attending to every key up to kv_len (one row always does): no
        # mask is needed, and SDPA runs faster without one (~13 us a layer at batch 1 on a CPU).
        self.sees_all = dynamic and steps == 1 and bool((starts + lengths == self.kv_len).all())
        # (first slot, rows) where the rows are the consecutive slots first, first + 1, ... (every
        # slot in order; one row always is): the cache returns a view of them instead of gathering
        # a copy per layer. Read from the tensors only for dynamic layouts (a graph must not sync).
        self.slot_run = (0, len(slots)) if every_slot else None
        if dynamic and not shared_slots:
            first = int(slots[0])
            if bool((slots == torch.arange(first, first + len(slots), device=device)).all()):
                self.slot_run = (first, len(slots))

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The mask attention needs, or None where it needs none: causal prompt rows (attention
        applies the causal mask itself) and one-token rows that see every key."""
        return None if self.causal or self.sees_all else self.mask

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        # Padded query rows may see key 0 only: a row with nothing visible would give NaN.
        visible_upto = torch.where(self._valid, self.position_ids, 0)
        keys = torch.arange(self.kv_len, device=self.slots.device)
        return keys[None, None, None, :] <= visible_upto[:, None, :, None]
