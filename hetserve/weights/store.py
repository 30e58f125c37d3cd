"""A host's cache of streamed weights: `$HETSERVE_HOME/weights/<model-hash>/`.

Each tensor is its own single-tensor safetensors file named after the tensor, so a stage loads it
with the ordinary loader (a `model.safetensors.index.json` lists the complete ones). A tensor in
transfer is written to `<name>.safetensors.<owner>.part`, header first and then its data in order,
so after a crash the part's length says where to resume. A part becomes the real file only after
its data hashed to the manifest's digest, by an atomic rename: a host never loads a half-written
or corrupted tensor, and a complete file that fails its hash later is deleted and fetched again.

The cache holds one folder per model hash; other models' folders are removed, least recently
written first, where a slice needs their room (`make_room`).

Parts are named per host because hosts of one machine share the cache (a GPU box runs one
`hetserve-worker@N` per GPU, all in /var/lib/hetserve): with one part name, two hosts fetching a
tensor at once appended into and renamed away each other's part. Two hosts may now both fetch a
tensor; each renames a whole, hash-checked copy into place. A store holds a lock on its owner
name, so two hosts that would share one (two `join --device cpu` without `--name`) do not: the
second adds its process id. Files another host removes meanwhile (a corrupted copy, another
model's folder) are taken as gone, and the index is rewritten under a lock, so a host never
drops from it a tensor another host has just added.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomic
from ..model.resolve import ModelError, hetserve_home
from ..wire.messages import ManifestEntry
from .manifest import hash_range, safetensors_header

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
DISK_MARGIN = 64 << 20  # left free on the disk beyond the weights, for logs and the index
PID_MARK = "+"  # owner + PID_MARK + process id: a name no --name can take (owners are [\w.-] once cleaned)


def weights_root() -> Path:
    return hetserve_home() / "weights"


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`. Another host of the machine may remove files or whole
    folders meanwhile: those count as 0 (os.walk skips a folder it cannot list)."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total


def cached_weights() -> dict[str, int]:
    """Model hash -> bytes in its folder, for every model in this host's cache: complete tensors
    and the parts of unfinished fetches (resumed, so the leader counts them as there)."""
    root = weights_root()
    if not root.is_dir():
        return {}
    return {d.name: _folder_bytes(d) for d in root.iterdir() if d.is_dir()}


def disk_room(limit: int | None) -> int:
    """Bytes of weights this host may still add to its cache: free disk (less a margin), and
    at most `limit` (join --disk-limit) in the whole cache, part files of unfinished fetches
    included."""
    root = weights_root()
    root.mkdir(parents=True, exist_ok=True)
    room = shutil.disk_usage(root).free - DISK_MARGIN
    if limit is not None:
        room = min(room, limit - _folder_bytes(root))
    return max(0, room)


def make_room(need: int, limit: int | None, keep: str) -> int:
    """Room for `need` more bytes of model `keep`'s weights: other models' cached weights are
    removed, least recently written first, until it fits or none is left (a cache kept every model
    it ever held, and under --disk-limit a model update or two left a host without room for good).
    Returns the room then."""
    room = disk_room(limit)
    others = {}
    for d in weights_root().iterdir():
        try:
            if d.is_dir() and d.name != keep:
                others[d] = d.stat().st_mtime
        except FileNotFoundError:  # another host of this machine removed it just now
            pass
    for directory in sorted(others, key=others.get):
        if room >= need:
            break
        if _in_use(directory):  # another host of this machine fetching that model: never pulled from under it
            continue
        size = _folder_bytes(directory)
        shutil.rmtree(directory, ignore_errors=True)
        log.warning("removed the cached weights of model %s (%.1f MiB) to make room for model %s", directory.name,
                    size / 2**20, keep)
        room = disk_room(limit)
    return room


def _try_lock(path: Path, create: bool = True) -> int | None:
    """An exclusive lock on the file (released with the descriptor), or None if another holds it.
    Without `create`, FileNotFoundError where the file is gone."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _in_use(directory: Path) -> bool:
    """Whether a live WeightStore holds a lock in the model folder."""
    for lock in directory.glob(".*.lock"):
        try:
            fd = _try_lock(lock, create=False)
        except FileNotFoundError:  # its store closed and a later one removed it just now
            continue
        if fd is None:
            return True
        os.close(fd)  # releases the probe's lock
    return False


def tensor_header(entry: ManifestEntry) -> bytes:
    """The safetensors header of a file holding only this tensor (padded to 8 bytes, as the
    format recommends, so the data is aligned)."""
    meta = json.dumps({entry.name: {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [0, entry.size]}},
                      separators=(",", ":")).encode()
    meta += b" " * (-len(meta) % 8)
    return struct.pack("<Q", len(meta)) + meta


@dataclass(frozen=True)
class Missing:
    entry: ManifestEntry
    offset: int  # bytes of its data already in the part file


class WeightStore:
    def __init__(self, model_hash: str, owner: str):
        """owner: names this host's part files, the same across its restarts (resumes) and apart
        from other hosts of the machine (its --name, or its device; with the process id added
        while another live store holds the name). close() when done."""
        self.root = weights_root() / model_hash
        self.root.mkdir(parents=True, exist_ok=True)
        owner = re.sub(r"[^\w.-]", "_", owner)  # a file name's part, whatever the host is called
        self._lock = self._lock_owner(owner)
        if self._lock is None:
            # The process id, and a count where that is held too (containers sharing a cache each
            # run their host as process 1): never two stores writing one part file.
            shared, tries = owner, 0
            while self._lock is None:
                owner = f"{shared}{PID_MARK}{os.getpid()}" + (f"-{tries}" if tries else "")
                self._lock, tries = self._lock_owner(owner), tries + 1
            log.warning("another host of this machine is fetching as %r: this one names its part files %r (give "
                        "hosts of one machine a --name each to resume their fetches after a restart)", shared, owner)
        self.owner = owner
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """No later process resumes the parts of an owner named for a process id: remove those
        whose process is gone (nobody holds their lock), else they would fill the cache for good."""
        for lock in self.root.glob(f".*{PID_MARK}*.lock"):
            owner = lock.name[1:-len(".lock")]
            fd = self._lock_owner(owner)
            if fd is None:
                continue
            for part in self.root.glob(f"*.{owner}.part"):
                part.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            os.close(fd)

    def _lock_owner(self, owner: str) -> int | None:
        """An exclusive lock on the owner name (released with the descriptor), or None if held."""
        return _try_lock(self.root / f".{owner}.lock")

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def path(self, entry: ManifestEntry) -> Path:
        return self.root / (entry.name if entry.kind == "file" else f"{entry.name}.safetensors")

    def part(self, entry: ManifestEntry) -> Path:
        return self.path(entry).with_name(f"{self.path(entry).name}.{self.owner}.part")

    def verified(self, entry: ManifestEntry) -> bool:
        """The complete file is there and hashes right; a corrupted one is deleted."""
        path = self.path(entry)
        if not path.is_file():
            return False
        try:
            start = 0 if entry.kind == "file" else self._data_start(path, entry)
            ok = path.stat().st_size == start + entry.size and hash_range(path, start, entry.size) == entry.sha256
        except ModelError:
            ok = False
        except FileNotFoundError:  # another host of this machine found it corrupted and removed it
            ok = False
        if not ok:
            log.warning("cached %s is corrupted or incomplete: fetching it again", path.name)
            path.unlink(missing_ok=True)
        return ok

    def _data_start(self, path: Path, entry: ManifestEntry) -> int:
        start, header = safetensors_header(path)
        info = header.get(entry.name, {})
        if info.get("dtype") != entry.dtype or info.get("shape") != entry.shape:
            raise ModelError(f"{path.name} holds another tensor")
        return start

    def missing(self, entries: list[ManifestEntry]) -> list[Missing]:
        """What must still be fetched of `entries`, each from where its part file stopped."""
        out = []
        for entry in entries:
            if self.verified(entry):
                continue
            part = self.part(entry)
            head = b"" if entry.kind == "file" else tensor_header(entry)
            offset = 0
            if part.is_file():
                have = part.stat().st_size - len(head)
                with open(part, "rb") as f:
                    same_head = f.read(len(head)) == head
                if same_head and 0 <= have <= entry.size:
                    offset = have
                else:
                    part.unlink()
            out.append(Missing(entry, offset))
        return out

    def open_part(self, item: Missing):
        """The part file, positioned to append `item`'s data from its offset."""
        part = self.part(item.entry)
        if item.offset == 0:
            f = open(part, "wb")
            if item.entry.kind == "tensor":
                f.write(tensor_header(item.entry))
            return f
        return open(part, "ab")

    def finish(self, entry: ManifestEntry) -> bool:
        """Hash the completed part; rename it into place when right, delete it when wrong."""
        part = self.part(entry)
        start = 0 if entry.kind == "file" else len(tensor_header(entry))
        if part.stat().st_size == start + entry.size and hash_range(part, start, entry.size) == entry.sha256:
            os.replace(part, self.path(entry))
            return True
        part.unlink()
        return False

    def write_index(self) -> None:
        """List every complete tensor so the stage loader finds it (atomically replaced). Under a
        lock: files are only added meanwhile, so each writer lists at least what the one before
        it listed, and the index never loses a tensor another host just wrote it for."""
        with open(self.root / ".index.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            weight_map = {f.name[: -len(".safetensors")]: f.name for f in sorted(self.root.glob("*.safetensors"))}
            write_atomic(self.root / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
