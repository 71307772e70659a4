"""The run folder (DESIGN.md #8): it describes itself and refuses to be overwritten.

`recipe.json` holds the resolved spec and must match on resume; `env.json` the versions, commit,
hardware and command of the first start, with each resume appended; `metrics.jsonl` one JSON
record per log, trimmed back to the checkpoint on resume.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHTS, write_text


class RunFolderError(ValueError):
    """The run folder holds a different run: refused, nothing overwritten."""


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a run: versions, commit, hardware, command line (DESIGN.md #8)."""
    import torchvision

    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "commit": commit,
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "command": sys.argv,
    }


def check_run_folder(run_dir: Path, spec_dict: dict[str, Any]) -> None:
    path = run_dir / "recipe.json"
    if not path.exists():
        if any(run_dir.glob("checkpoint-*.pt")) or (run_dir / WEIGHTS).exists():
            raise RunFolderError(f"{run_dir} holds a run without recipe.json; use a new --out")
        return
    old = json.loads(path.read_text())
    if old != spec_dict:
        diffs = _differences(old, spec_dict)
        raise RunFolderError(
            f"{run_dir} holds a different run ({'; '.join(diffs)}); nothing was overwritten. "
            "Use a new --out, or the same options to resume it"
        )


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def record_environment(path: Path, env: dict[str, Any]) -> dict[str, Any]:
    """env.json describes the first start; each resume is appended, so a run that spanned
    several commits or machines says so."""
    if path.exists():
        first = json.loads(path.read_text())
        first.setdefault("resumes", []).append(env)
        env = first
    write_json(path, env)
    return env


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from a kill mid-write
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
