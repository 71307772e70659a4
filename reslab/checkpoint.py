"""Atomic checkpoints with retention, loading that cannot run code, safetensors weights.

A checkpoint is written to a temporary file in the same folder, flushed, fsynced and renamed, so
a kill at any moment leaves either the old file or the new one, never half of one. The last
`keep` checkpoints are kept; if the newest cannot be read, resume falls back to the one before.
A write that fails (a full disk, a read-only folder) removes its temporary file and raises a
CheckpointError naming the file and the reason; the previous checkpoint is untouched.

Checkpoints and weights carry the SHA-256 of their contents (`content_digest`), checked on
loading: torch.load does not check its zip records' CRCs, so a flipped bit in a tensor would
otherwise load as a silently different model.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

CHECKPOINT_GLOB = "checkpoint-*.pt"
WEIGHTS = "model.safetensors"
DIGEST = "sha256"  # the key of the contents' digest, in a checkpoint and in the weights' metadata


class CheckpointError(ValueError):
    """An unreadable, truncated, unsafe or unwritable checkpoint or weights file."""


_WRITE_FAULTS = {
    errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "not writable", errno.EPERM: "not writable",
    errno.EROFS: "not writable (read-only file system)",
}


def write_error(path: Path, error: OSError) -> CheckpointError:
    """A clear error for a failed write: which file, why, and that the run can be resumed."""
    reason = _WRITE_FAULTS.get(error.errno, error.strerror or type(error).__name__)
    kept = list_checkpoints(path.parent)  # `path` itself is never half-written (atomic_write)
    state = (f"{kept[-1].name} is intact" if kept else "no checkpoint was written yet")
    after = "to resume from it" if kept else "(it starts from the beginning)"
    return CheckpointError(
        f"cannot write {path}: {reason} ({error}); {state}: free space or make the folder "
        f"writable, then rerun the same command {after}"
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    # Serialised in memory first: a failed write then raises Python's OSError with its errno,
    # where torch.save and safetensors would report a full disk as an opaque RuntimeError.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, an unwritable folder: say so, name the file
            raise write_error(path, e) from e
        raise
    _fsync_dir(path.parent)
    _remove_stale(path.parent, f".{path.name}.tmp-*")


def _remove_stale(folder: Path, pattern: str) -> None:
    """Temporary files of killed processes: never read, only in the way."""
    for stale in folder.glob(pattern):
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
            with contextlib.suppress(OSError):
                stale.unlink()


def write_text(path: Path, text: str) -> None:
    """A small text file (recipe.json, summary.json), written atomically like a checkpoint."""
    atomic_write(path, text.encode())


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    return sorted(Path(run_dir).glob(CHECKPOINT_GLOB))


def content_digest(obj: Any) -> str:
    """SHA-256 of nested dicts, lists and tensors (dtype, shape and bytes), in a fixed order:
    equal for a state and the same state loaded back, different for any changed bit."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write the checkpoint of iteration `step` atomically, with its digest; keep the newest
    `keep` (>= 2)."""
    path = checkpoint_path(run_dir, step)
    buffer = io.BytesIO()
    torch.save({**state, DIGEST: content_digest(state)}, buffer)
    atomic_write(path, buffer.getbuffer())
    for old in list_checkpoints(run_dir)[: -max(keep, 2)]:
        old.unlink(missing_ok=True)
    _remove_stale(Path(run_dir), f".{CHECKPOINT_GLOB}.tmp-*")
    return path


def load_plain(path: Path, what: str) -> Any:
    """torch.load(weights_only=True): tensors and plain data only, so a pickle that would run
    code is refused unopened; a CheckpointError naming the `what` and the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load {what} {path}: {first} (reslab loads only tensors and plain data; "
            f"it never runs code from a {what})"
        ) from e


def safe_load(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True), no fallback: a pickle that would run code is refused; a
    checkpoint whose contents do not match its digest is damaged."""
    state = load_plain(path, "checkpoint")
    if isinstance(state, dict) and DIGEST in state:  # checkpoints before the digest have none
        recorded = state.pop(DIGEST)
        if content_digest(state) != recorded:
            raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the "
                                  "SHA-256 it was saved with")
    return state


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint, falling back (with a warning naming both) past bad ones."""
    candidates = list_checkpoints(run_dir)[::-1]
    failed: list[Path] = []
    for path in candidates:
        try:
            state = safe_load(path)
        except CheckpointError as e:
            failed.append(path)
            last_error = e
            continue
        if failed:
            warnings.warn(
                f"checkpoint {failed[0]} is unreadable ({last_error}); resuming from {path}",
                stacklevel=2,
            )
        return state, path
    if failed:
        raise CheckpointError(
            f"no readable checkpoint in {run_dir}: {', '.join(map(str, failed))} failed to load; "
            "delete the run folder to start over"
        )
    return None


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Final weights as safetensors; `metadata` (model, options, normalisation, class names) as
    JSON, with the tensors' digest beside it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # One metadata key: safetensors writes several in a random order, and equal runs must write
    # equal bytes.
    meta = {"reslab": json.dumps({**metadata, DIGEST: content_digest(tensors)})}
    atomic_write(Path(path), safetensors_bytes(tensors, metadata=meta))


# What a file given where weights are expected is instead (file_kind), and the fix.
_NOT_WEIGHTS = {
    "onnx": "an ONNX model, not a weights file: give the run folder it was exported from, or "
            "its model.safetensors (reslab predict also runs the .onnx itself)",
    "torch-export": "a torch.export program (.pt2, for torch.export.load), not a weights file: "
                    "give the run folder it was exported from, or its model.safetensors",
    "torch-save": "a torch.save archive, not a reslab weights file: give a run folder or its "
                  "model.safetensors (a torchvision state dict goes to train --init-from)",
    "image": "an image, not a weights file: give a run folder or its model.safetensors",
}


def file_kind(path: Path) -> str:
    """What a model file is by its first bytes, whatever its name: "safetensors", "onnx",
    "torch-export" (a .pt2 program), "torch-save" (another zip archive of torch's), "image",
    or "unknown"."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return "unknown"  # the reader names the reason
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        return "torch-export" if any(n.endswith("/archive_format") for n in names) \
            else "torch-save"
    if head[:1] == b"\x08":  # ModelProto's first field, ir_version (a varint)
        return "onnx"
    from PIL import Image

    try:
        with Image.open(path):  # the header only
            return "image"
    except Exception:  # noqa: BLE001 (PIL raises many types for what it cannot identify)
        return "unknown"


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and reslab metadata from a safetensors file written by save_weights, checked
    against the digest it was written with (files written before the digest have none)."""
    if (kind := file_kind(path)) in _NOT_WEIGHTS:
        raise CheckpointError(f"{path} is {_NOT_WEIGHTS[kind]}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from e
    try:
        reslab = json.loads(meta["reslab"]) if "reslab" in meta else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has malformed reslab metadata (not JSON: {e})") from e
    if isinstance(reslab, dict) and DIGEST in reslab and \
            content_digest(tensors) != reslab.pop(DIGEST):
        raise CheckpointError(f"weights {path} are damaged: the tensors do not match the SHA-256 "
                              "they were saved with; restore the file or retrain")
    return tensors, reslab
