"""A model's manifest: every tensor and file a host may need, with its size and content hash.

The leader builds it from its model directory and serves it; a host checks its cache, or its own
copy (`join --model`), against it. A tensor's hash covers its raw data as stored in safetensors
(little-endian, stored dtype), so the same weights hash the same however they are sharded into
files. The model hash covers every entry, so a host holding that hash holds exactly these weights.

Hashing a model reads all of it (~1-2 GB/s), so a manifest is cached under
`$HETSERVE_HOME/manifests/` keyed by the directory and reused while every file keeps its size
and modification time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomic
from ..model.resolve import ModelError, hetserve_home
from ..wire.codec import decode, encode
from ..wire.messages import Manifest, ManifestEntry

FILES = ("config.json",)  # besides tensors, what a stage needs (it never tokenizes)
READ_BLOCK = 8 << 20
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")  # becomes a file name on hosts
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is not one we wrote or trust


@dataclass(frozen=True)
class Source:
    """Where the leader reads an entry's bytes: `size` bytes of `path` from `offset`."""

    path: Path
    offset: int


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset where tensor data starts, the JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ModelError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ModelError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a map)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and all(type(d) is int and d >= 0 for d in info["shape"])):
            raise ModelError(f"{path} is not a safetensors file (bad entry for {name!r:.80})")
    return 8 + length, header


def hash_range(path: Path, offset: int, size: int, progress=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                raise ModelError(f"{path} ends before byte {offset + size}")
            digest.update(block)
            left -= len(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def model_hash(entries: list[ManifestEntry]) -> str:
    canonical = [[e.kind, e.name, e.size, e.sha256, e.dtype, list(e.shape)] for e in sorted(entries, key=lambda e: e.name)]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def scan(model_dir: Path) -> tuple[list[tuple[ManifestEntry, Source]], int]:
    """Every entry without its hash yet (sha256 ''), where to read it, and the total bytes."""
    items = []
    for name in FILES:
        path = model_dir / name
        if not path.is_file():
            raise ModelError(f"{model_dir} has no {name}")
        items.append((ManifestEntry(name, "file", path.stat().st_size, ""), Source(path, 0)))
    for file in sorted(model_dir.glob("*.safetensors")):
        start, header = safetensors_header(file)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            items.append((ManifestEntry(name, "tensor", end - begin, "", info["dtype"], list(info["shape"])),
                          Source(file, start + begin)))
    return items, sum(e.size for e, _ in items)


def build_manifest(model_dir: Path, progress: bool = True) -> tuple[Manifest, dict[str, Source]]:
    from tqdm import tqdm

    items, total = scan(model_dir)
    entries, sources = [], {}
    # On a terminal only: in a daemon's log a bar is noise.
    with tqdm(total=total, desc=f"hashing {model_dir.name}", unit="B", unit_scale=True,
              disable=None if progress else True) as bar:
        for entry, source in items:
            sha = hash_range(source.path, source.offset, entry.size, bar)
            entries.append(ManifestEntry(entry.name, entry.kind, entry.size, sha, entry.dtype, entry.shape))
            sources[entry.name] = source
    return Manifest(model_hash(entries), entries), sources


def _stamps(model_dir: Path) -> dict[str, list[int]]:
    files = [model_dir / n for n in FILES] + sorted(model_dir.glob("*.safetensors"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}


def load_manifest(model_dir: Path, progress: bool = True) -> tuple[Manifest, dict[str, Source]]:
    """The manifest of a model directory, from the cache while its files are unchanged."""
    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]
    cache = hetserve_home() / "manifests" / f"{key}.msgpack"
    stamps = _stamps(model_dir)
    if cache.is_file():
        try:
            stored = json.loads(cache.with_suffix(".json").read_text())
            if stored == stamps:
                manifest = decode(cache.read_bytes(), expect=(Manifest,))
                items, _ = scan(model_dir)
                return manifest, {e.name: s for e, s in items}
        except (OSError, ValueError):
            pass  # unreadable cache: hash again
    manifest, sources = build_manifest(model_dir, progress)
    write_atomic(cache, encode(manifest))
    write_atomic(cache.with_suffix(".json"), json.dumps(stamps))
    return manifest, sources


# bytes per value of each safetensors dtype: a tensor entry's size must be its shape's values x this
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def check_entries(manifest: Manifest) -> None:
    """Refuse entries a host cannot cache and load: names that could escape the cache directory
    (or are not file names), unknown kinds or dtypes, sizes that are not their shape's, a missing
    config.json. The leader checks its own model's at start; hosts, what the leader sends."""
    for e in manifest.entries:
        if e.kind == "file" and e.name not in FILES or e.kind not in ("file", "tensor"):
            raise ModelError(f"the manifest lists an unexpected {e.kind} {e.name!r:.80}")
        if not SAFE_NAME.fullmatch(e.name) or not HEX64.fullmatch(e.sha256) or e.size < 0:
            raise ModelError(f"the manifest entry {e.name!r:.80} is malformed (names streamed to hosts are "
                             f"{SAFE_NAME.pattern})")
        if e.kind == "tensor" and (e.dtype not in DTYPE_BYTES or any(d < 0 for d in e.shape)
                                   or e.size != math.prod(e.shape) * DTYPE_BYTES[e.dtype]):
            raise ModelError(f"the manifest entry {e.name!r:.80} is malformed ({e.dtype} {e.shape}, {e.size} bytes)")
    names = {e.name for e in manifest.entries}
    for name in FILES:
        if name not in names:
            raise ModelError(f"the manifest has no {name}")


def check_manifest(manifest: Manifest, expected_hash: str) -> None:
    """Refuse a manifest a host cannot use (check_entries), or that is not the one the leader
    assigned (the hash is recomputed, not trusted)."""
    check_entries(manifest)
    if model_hash(manifest.entries) != manifest.model_hash or manifest.model_hash != expected_hash:
        raise ModelError("the leader's manifest does not match the model hash it assigned")


def describe_mismatch(local: Manifest, remote: Manifest) -> str:
    """Why a host's own copy is not the leader's model, in a sentence."""
    mine = {e.name: e for e in local.entries}
    theirs = {e.name: e for e in remote.entries}
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    differ = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
    parts = []
    for label, names in (("missing", missing), ("not in the leader's model", extra), ("different", differ)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
    return "; ".join(parts) or "the same entries but a different hash"
