"""Offline planning inputs: hosts known only by their device kind, a model known by its config.

Nothing here is measured on the planned devices. Each host's profile is predicted from one
measured reference profile (predict_profile: the roofline ratio above a fixed floor) for the
model's layer shape; GPUs from an H100 Llama-3-8B bf16 profile, CPUs from this repo's CPU SmolLM2
fp32 profile (copies of examples/profiles/ shipped as package data). The plan's notes say so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .cluster import Cluster
from .cost import DEVICE_SPECS, DeviceSpec, predict_head_ms, predict_profile
from .device_profile import DeviceProfile
from .model_shape import ConfigShape, layer_shape
from .planner import HostInput

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "data" / "reference_profiles"
# device class -> (measured profile, the spec kind it was measured on, what it is)
REFERENCES = {
    # Timed before stages decoded from CUDA graphs with int8 / int4 kernels of ours (eager layers,
    # quanto's kernels): it overstates every layer's decode time and quantized layers' most of
    # all (docs/benchmarks.md). To be measured again with `hetserve profile --device cuda`.
    "gpu": ("h100-llama-3-8b-bf16.json", "H100", "H100 80GB, Llama-3-8B layer, bf16, measured 2026-11-22 with "
            "eager decode and quanto's kernels, which stages no longer run: quantized layers decode faster "
            "than predicted"),
    "cpu": ("cpu-2t-smollm2-135m-fp32.json", "CPU", "a 2-core CPU, SmolLM2-135M layer, fp32, measured 2026-12-05 "
            "with 2 threads and each linear the fastest way measured (model/cpu_linear.py)"),
}
DTYPE_PREFERENCE = ("bfloat16", "float16", "float32")


def device_class(kind: str) -> str:
    return "cpu" if kind == "CPU" else "gpu"


def cluster_dtype(kinds: list[str]) -> str:
    """One compute dtype for every stage: the first of bf16, fp16, fp32 that all devices run
    (T4, P100 and V100 have no bf16, so a cluster with one of them runs fp16)."""
    common = set(DTYPE_PREFERENCE)
    for kind in kinds:
        common &= set(DEVICE_SPECS[kind].dtypes)
    return next(d for d in DTYPE_PREFERENCE if d in common)


def predicted_profile(shape: ConfigShape, spec: DeviceSpec, dtype: str, reference: DeviceProfile,
                      reference_spec: DeviceSpec) -> DeviceProfile:
    """A profile of this model's layers on this device kind, in this dtype, from a measured one."""
    itemsize = 4 if dtype == "float32" else 2
    precisions = [p for p in spec.precisions if p in reference.layer_bytes]
    prof = predict_profile(reference, reference_spec, spec, layer_shape(shape, precisions, itemsize))
    head_bytes = shape.head_params * itemsize
    return replace(prof, model=shape.name, dtype=dtype, embed_bytes=shape.embed_params * itemsize,
                   head_bytes=head_bytes,
                   head_ms=predict_head_ms(reference, reference_spec, spec, head_bytes, shape.head_params))


def load_references() -> dict[str, DeviceProfile]:
    return {cls: DeviceProfile.load(REFERENCE_DIR / file) for cls, (file, _, _) in REFERENCES.items()}


def offline_hosts(cluster: Cluster, shape: ConfigShape, references: dict[str, DeviceProfile]) -> list[HostInput]:
    dtype = cluster_dtype([h.device for h in cluster.hosts])
    profiles: dict[str, DeviceProfile] = {}
    for kind in {h.device for h in cluster.hosts}:
        cls = device_class(kind)
        profiles[kind] = predicted_profile(shape, DEVICE_SPECS[kind], dtype, references[cls],
                                           DEVICE_SPECS[REFERENCES[cls][1]])
    return [HostInput(h.name, h.memory_bytes, profiles[h.device], h.link_gbps, h.link_ms) for h in cluster.hosts]


def speed_note(cluster: Cluster) -> str:
    kinds = sorted({h.device for h in cluster.hosts})
    used = sorted({device_class(k) for k in kinds})
    sources = "; ".join(REFERENCES[c][2] for c in used)
    return (f"speed: predicted, not measured: the profiles of {', '.join(kinds)} are predicted from a measured "
            f"reference profile ({sources}) by the roofline ratio above a fixed floor")
