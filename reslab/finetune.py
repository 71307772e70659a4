"""Starting a run from trained weights (`reslab train --init-from SOURCE`): a reslab run folder,
a reslab model.safetensors, or a torchvision ResNet state dict on disk (`resnet50-0676ba61.pth`,
read with torch.load(weights_only=True), so a pickle that would run code is refused unopened).

Every tensor of the body must fit the new model; the classifier (fc) is taken too when its shape
fits, else it keeps its fresh initialisation and the run says so. The source's SHA-256 is part of
the run's spec, so a fine-tune resumed from a changed file is refused as a different run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WEIGHTS, CheckpointError, load_plain, load_weights

# The suffixes of torchvision's (and torch.save's) weight files, read as plain state dicts.
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
CLASSIFIER = ("fc.weight", "fc.bias")


def resolve_source(source: str | Path) -> Path:
    """The weights file of a source: a run folder's model.safetensors, or the file itself; a
    clear error for anything else. A released name or torchvision:WEIGHTS (pretrained.py) is
    its file: the released one's SHA-256 checked, torchvision's from torch.hub's cache."""
    from .pretrained import is_pretrained, weights_file

    if is_pretrained(source) and not Path(source).exists():
        return weights_file(str(source))
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / WEIGHTS
        if not path.is_file():
            raise ValueError(f"--init-from {source}: a folder without {WEIGHTS} (not a finished "
                             "run folder); give a finished run, a model.safetensors or a .pth")
        return path.resolve()
    if not path.is_file():
        raise ValueError(f"--init-from {source}: no such file or run folder")
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"--init-from {source}: not a weights file (.safetensors for reslab's, "
                         f"{'/'.join(TORCH_SUFFIXES)} for a torchvision state dict)")
    return path.resolve()


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_source(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a resolved source (resolve_source)."""
    if path.suffix == ".safetensors":
        state, _ = load_weights(path)
        return state
    state = load_plain(path, "--init-from weights file")
    # torchvision's reference scripts save {"model": state_dict, "optimizer": ...}.
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"--init-from {path} is not a state dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved keys


def initialise(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> list[str]:
    """Copy the source's tensors into `model`; returns notes for the user. Every key of the
    body must be in the source with its shape; the classifier is re-initialised when its shape
    differs (another number of classes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in CLASSIFIER]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"--init-from {source} does not fit this model: it lacks {missing[0]}"
                         f"{more}; is it the same network (depth, shortcut option)?")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"--init-from {source} does not fit this model: it has {unexpected[0]}, "
                         "which this network has not (another depth or shortcut option?)")
    for k, v in own.items():
        if k in CLASSIFIER or k not in state:
            continue
        if state[k].shape != v.shape:
            hint = (" (another number of input channels)" if k == "conv1.weight" else
                    "; a bottleneck net from torchvision needs --layout v1.5"
                    if "conv" in k else "")
            raise ValueError(f"--init-from {source} does not fit this model: {k} is "
                             f"{tuple(state[k].shape)} there, {tuple(v.shape)} here{hint}")
    notes = []
    take = dict(state)
    fits = all(k in state and state[k].shape == own[k].shape for k in CLASSIFIER)
    if not fits:
        for k in CLASSIFIER:
            take.pop(k, None)
        before = state["fc.weight"].shape[0] if "fc.weight" in state else "no"
        notes.append(f"classifier re-initialised: the source has {before} classes, this run "
                     f"{own['fc.weight'].shape[0]}")
    with torch.no_grad():
        for k, v in take.items():
            own[k].copy_(v)
    return notes


def check_init(path: str, sha256: str | None) -> Path:
    """The source of a spec's init_from, checked against the SHA-256 the run was started with."""
    source = resolve_source(path)
    if sha256 is not None and file_digest(source) != sha256:
        raise ValueError(f"--init-from {source} has changed since this run started from it "
                         f"(SHA-256 {sha256[:12]}... then); restore it, or use a new --out")
    return source
