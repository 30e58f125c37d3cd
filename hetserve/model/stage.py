"""One pipeline stage: a contiguous slice of decoder layers built from only its own weights.

Stage 0 also embeds token ids; the last stage also applies the final norm, lm_head and sampling.
Layers are created on the meta device and receive their tensors straight from the safetensors
files, so a stage never materializes another stage's layers: its peak memory is its share of the
weights plus its KV cache.

The token path through a stage, top to bottom:
  token ids [B, T] (stage 0) -> embed -> hidden [B, T, H]
  hidden [B, T, H] -> each decoder layer (writes its K/V for these rows into the slot cache)
  last stage: hidden at each row's last new token [B, H] -> norm -> lm_head -> logits [B, V] -> ids [B]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from . import attention, cpu_linear, weight_only
from .arch import architecture, attention_window
from .copies import column
from .decode_layers import DecodeLayers
from .kv_cache import SlotKVCache, StepLayout
from .precision import apply_precisions, module_bytes
from .resolve import ModelError
from ..wire.messages import SamplingRows
from .sampling import sample
from .static_steps import StaticSteps

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StageSpec:
    start: int  # first decoder layer (global index), inclusive
    end: int  # last decoder layer, exclusive
    first: bool  # embeds token ids
    last: bool  # norm + lm_head + sampling
    dtype: str = "float32"
    max_seqs: int = 8  # KV-cache slots: requests running at once
    max_context: int = 2048  # prompt + completion tokens per request
    precisions: tuple[str, ...] = ()  # per layer of the slice (model/precision.py); () = all native
    input_scales: tuple[dict[str, float], ...] = ()  # per layer of the slice: w8a8 activation scales (model/w8a8.py)


def load_config(model_dir: Path):
    config = AutoConfig.from_pretrained(model_dir)
    architecture(config)  # refuses unsupported families with a clear message
    return config


def tensor_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    names: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def stage_tensor_names(config, stored: Iterable[str], spec: StageSpec) -> dict[str, str]:
    """Local name -> stored name of every tensor stage `spec` loads, out of the `stored` names
    (its layers; the embedding on the first stage; norm and lm_head, or the tied embedding, on
    the last). Hosts fetch exactly these when weights are streamed."""
    stored = set(stored)
    wanted = {}
    for i in range(spec.start, spec.end):
        prefix = f"model.layers.{i}."
        wanted.update({f"layers.{i - spec.start}.{n[len(prefix):]}": n for n in stored if n.startswith(prefix)})
    if spec.first:
        wanted["embed.weight"] = "model.embed_tokens.weight"
    if spec.last:
        wanted["norm.weight"] = "model.norm.weight"
        if "lm_head.weight" in stored:
            wanted["lm_head.weight"] = "lm_head.weight"
        elif getattr(config, "tie_word_embeddings", False):
            wanted["lm_head.weight"] = "model.embed_tokens.weight"
        else:
            raise ModelError("the model has no lm_head.weight and does not tie its embeddings")
    return wanted


def read_tensors(index: dict[str, Path], wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """wanted: local name -> stored name. Reads only those tensors (one stored tensor may serve
    two local names, e.g. tied embedding and lm_head)."""
    by_file: dict[Path, set[str]] = {}
    for stored in wanted.values():
        if stored not in index:
            raise ModelError(f"tensor {stored} is missing from the model files")
        by_file.setdefault(index[stored], set()).add(stored)
    loaded = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                loaded[name] = f.get_tensor(name)
    return {local: loaded[stored] for local, stored in wanted.items()}


class StageModel:
    def __init__(self, model_dir: Path, spec: StageSpec, device: str = "cpu", cuda_graphs: bool = True,
                 quanto_kernels: bool = False):
        """quanto_kernels: int8 / int4 layers on a GPU keep quanto's matmuls instead of
        weight_only.py's (a baseline for benchmarks)."""
        config = load_config(model_dir)
        total = config.num_hidden_layers
        if not 0 <= spec.start < spec.end <= total:
            raise ModelError(f"layer range [{spec.start}, {spec.end}) is outside the model's {total} layers")
        if spec.dtype not in DTYPES:
            raise ModelError(f"dtype {spec.dtype!r} is not one of {sorted(DTYPES)}")
        window = attention_window(config)
        if window is not None and spec.max_context > window:
            raise ModelError(f"max_context {spec.max_context} exceeds the model's sliding window {window}")
        self.spec = spec
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's current device: cuda:N's graphs and streams there
        self.dtype = DTYPES[spec.dtype]
        arch = architecture(config)

        # Layers are numbered from 0 inside a stage: attention calls cache.update(..., layer_idx).
        stage_config = AutoConfig.from_pretrained(model_dir)
        stage_config.num_hidden_layers = spec.end - spec.start
        # On a GPU, decode attention without repeated K/V heads (attention.py); on CPU transformers'
        # own SDPA, which keeps the output identical to transformers'.
        stage_config._attn_implementation = attention.NAME if self.device.type == "cuda" else "sdpa"
        self.config = stage_config

        index = tensor_index(model_dir)
        tensors = read_tensors(index, stage_tensor_names(config, index, spec))

        with torch.device("meta"):
            self.layers = torch.nn.ModuleList(
                arch.decoder_layer(stage_config, layer_idx=i) for i in range(stage_config.num_hidden_layers)
            )
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size) if spec.first else None
            self.norm = arch.norm(config.hidden_size, eps=config.rms_norm_eps) if spec.last else None
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False) if spec.last else None
        self._assign(self.layers, tensors, "layers.")
        apply_precisions(self.layers, list(spec.precisions) or ["native"] * len(self.layers), self.device,
                         spec.input_scales)
        if weight_only.available(self.device) and not quanto_kernels and {"int8", "int4"} & set(spec.precisions):
            failure = weight_only.kernel_failure(self.device, self.dtype)
            if failure is None:
                log.info("%d quantized linears run hetserve's kernels (model/weight_only.py)",
                         weight_only.replace_quanto_linears(self.layers))
            else:
                log.warning("int8 kernels do not run on %s in %s (%s): quanto's kernels serve", self.device,
                            spec.dtype, failure)
        if self.embed is not None:
            self._assign(self.embed, tensors, "embed.")
        if self.norm is not None:
            self._assign(self.norm, tensors, "norm.")
            if self.embed is not None and tensors["lm_head.weight"] is tensors["embed.weight"]:
                self.lm_head.weight = self.embed.weight  # tied: one copy (a cast or a device copy would make two)
            else:
                self._assign(self.lm_head, tensors, "lm_head.")
        # Rotary buffers are computed, not stored: build on the real device (a meta skeleton
        # would leave inv_freq uninitialised and silently wreck the output).
        with self.device:
            self.rotary = arch.rotary(config=stage_config)

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=stage_config.num_hidden_layers, slots=spec.max_seqs,
            kv_heads=config.num_key_value_heads, head_dim=head_dim,
            max_context=spec.max_context, dtype=self.dtype, device=self.device,
        )
        self.hidden_size = config.hidden_size
        # A stage that is first and last keeps the token each slot sampled last [max_seqs], on the
        # device: a row may take it as its input (decode-ahead, `run`'s feeds) before the leader
        # has seen it, so the next step is queued while this one computes.
        self.sampled = torch.zeros(spec.max_seqs, dtype=torch.int64, device=self.device) \
            if spec.first and spec.last else None
        self.static_steps = StaticSteps(self, capture=self.device.type == "cuda" and cuda_graphs)
        # Fixed-shape steps run the written-out layers (decode_layers.py) where the architecture
        # fits, with their elementwise kernels fused (torch.compile) when steps are captured as graphs.
        self.decode_layers = DecodeLayers(self.layers, compile=self.static_steps.capture) if \
            DecodeLayers.supports(self.layers, stage_config) else None
        modules = [m for m in (self.layers, self.embed, self.norm, self.lm_head) if m is not None]
        if self.device.type == "cpu":  # each product a faster way than torch's call (cpu_linear.py)
            linears = [*self.layers.modules(), *(self.decode_layers.linears() if self.decode_layers else ()),
                       *((self.lm_head,) if self.lm_head is not None else ())]
            log.debug("%d linears run cpu_linear's ways", cpu_linear.adopt(linears))
        for module in modules:
            # Loaded parameters keep requires_grad (load_state_dict with assign): a captured step's
            # output would then hold its autograd graph, and with it every saved activation and
            # dequantized weight, for as long as the graph lives (int8 prefill buckets filled an H200).
            module.requires_grad_(False)
        self.weight_bytes = module_bytes(*modules)

    def use_transformers_layers(self) -> None:
        """Decode through transformers' own layers from here on (graphs recaptured on use): the
        fallback where torch.compile or Triton does not work on a device, and a baseline."""
        self.decode_layers = None
        self.static_steps = StaticSteps(self, capture=self.static_steps.capture)

    @property
    def decode_reads_cache_in_place(self) -> bool:
        """Decode attention reads each row's slot where it lies (slot_attention.py): steps need no
        K/V gather and no context bucket."""
        return self.decode_layers is not None and self.decode_layers.in_place_attention

    def _assign(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        state = {k[len(prefix):]: v.to(device=self.device, dtype=self.dtype)
                 for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ModelError(f"weights do not match the architecture: missing {missing[:4]}, unexpected {unexpected[:4]}")
        module.eval()

    @torch.no_grad()  # not inference_mode: quanto's int4 weights fail under it
    def forward(self, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                inputs: torch.Tensor, sampling: SamplingRows | None = None) -> torch.Tensor:
        """Run one micro-batch through this stage.

        slots, starts, lengths: [B] int64. inputs: token ids [B, T] on stage 0, else hidden
        states [B, T, H]. Returns hidden states [B, T, H], or on the last stage token ids [B].
        """
        hidden = self.hidden_states(slots, starts, lengths, inputs)
        if self.norm is None:
            return hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, lengths - 1]  # [B, H]: each row's newest token
        logits = self.lm_head(self.norm(last)).float()  # [B, V]
        return sample(logits, sampling)

    def run(self, slots: list[int], starts: list[int], lengths: list[int], inputs: torch.Tensor,
            sampling: SamplingRows | None = None, feeds: list[int] = ()) -> torch.Tensor:
        """One micro-batch as the host gets it (columns as lists), by the path that serves it: a
        fixed-shape step from CUDA graphs where they are on (decode; prefill where its attention
        reads the cache in place), else forward(). feeds: rows (of one token) whose input is the
        token their slot sampled last here, in place of inputs' placeholder; nothing waits for it."""
        device = self.device
        if feeds:
            rows = column(feeds, device)
            fed = self.sampled.index_select(0, column([slots[r] for r in feeds], device))
            inputs = inputs.index_put((rows, torch.zeros_like(rows)), fed)
        if self.static_steps.capture and max(lengths) == 1:
            out = self.decode(slots, starts, inputs, sampling)
        elif self.static_steps.capture and self.static_steps.serves_prefill(sum(lengths)):
            out = self.prefill(slots, starts, lengths, inputs, sampling)
        else:
            out = self.forward(column(slots, device), column(starts, device), column(lengths, device), inputs,
                               sampling)
        if self.sampled is not None:  # out: token ids [B]
            self.sampled.index_copy_(0, column(slots, device), out)
        return out

    @torch.no_grad()
    def decode(self, slots: list[int], starts: list[int], inputs: torch.Tensor,
               sampling: SamplingRows | None = None) -> torch.Tensor:
        """One decode micro-batch (one new token per row) at bucketed static shapes: from a CUDA
        graph on a GPU (static_steps.py). Returns what forward() returns."""
        out = self.static_steps.decode(slots, starts, inputs)
        return out if self.norm is None else sample(out, sampling)

    @torch.no_grad()
    def prefill(self, slots: list[int], starts: list[int], lengths: list[int], inputs: torch.Tensor,
                sampling: SamplingRows | None = None) -> torch.Tensor:
        """One prefill micro-batch as one row per prompt token, at a bucketed static shape: from a
        CUDA graph on a GPU (static_steps.py). Returns what forward() returns."""
        out = self.static_steps.prefill(slots, starts, lengths, inputs)
        return out if self.norm is None else sample(out, sampling)

    @torch.no_grad()
    def static_step(self, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, inputs: torch.Tensor,
                    kv_len: int, every_slot: bool = False, shared_slots: bool = False,
                    picks: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed-shape step a graph captures: no host sync, rows of length 0 are padding.
        inputs [b, 1] or [b, 1, H] -> hidden [b, 1, H], or logits [b, V] on the last stage (of the
        rows `picks` [p] where given: [p, V]). every_slot: row i is slot i for every slot;
        shared_slots: rows may share a slot (prompt tokens; StepLayout)."""
        layout = StepLayout(slots, starts, lengths, self.cache.scratch, steps=1, kv_len=kv_len, every_slot=every_slot,
                            shared_slots=shared_slots)
        hidden = self._layers(layout, inputs, self.decode_layers)[:, 0]  # [b, H]
        if self.norm is None:
            return hidden.unsqueeze(1)
        if picks is not None:
            hidden = hidden.index_select(0, picks)
        return self.lm_head(self.norm(hidden)).float()

    @torch.no_grad()
    def hidden_states(self, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      inputs: torch.Tensor) -> torch.Tensor:
        """The decoder layers of this stage: -> hidden states [B, T, H] (K/V written to the cache)."""
        if int(lengths.min()) < 1 or int((starts + lengths).max()) > self.spec.max_context:
            raise ValueError("micro-batch rows must have 1..max_context tokens")
        layout = StepLayout(slots, starts, lengths, self.cache.scratch)
        # A CPU decode step runs the written-out layers at its exact shape (no bucket: padding rows
        # would cost a CPU their arithmetic): their fused projections and fewer ops made SmolLM2's
        # batch-1 step 1.05x faster (docs/benchmarks.md). Elsewhere this path stays transformers'
        # layers: a GPU without graphs must not depend on the Triton kernels they call.
        decode = self.decode_layers if self.device.type == "cpu" and layout.position_ids.shape[1] == 1 else None
        return self._layers(layout, inputs, decode)

    def _layers(self, layout: StepLayout, inputs: torch.Tensor, decode_layers: DecodeLayers | None = None
                ) -> torch.Tensor:
        self.cache.begin(layout)
        hidden = self.embed(inputs) if self.embed is not None else inputs
        cos_sin = self.rotary(hidden, layout.position_ids)
        if decode_layers is not None:
            return decode_layers(hidden, cos_sin, self.cache, layout)
        mask = layout.attention_mask  # None: transformers' SDPA attends causally, or to every key
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=layout.position_ids,
                           past_key_values=self.cache, use_cache=True, position_embeddings=cos_sin)
        return hidden
