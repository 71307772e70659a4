"""A trained model for inference: a run folder's or a weights file's model, normalisation, spec,
class names and input size, checked as a command-line value would be. What eval, predict, export,
the experiments' reports and the released weights read; it never imports the training loop."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import WEIGHTS, CheckpointError
from .models import build_model, check_input_size
from .runfolder import RunSpec
from .runtime import resolve_device


def error_detail(error: Exception) -> str:
    """One line of an error; for load_state_dict's, the first size mismatch."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return next((line for line in lines if "mismatch" in line), lines[0])


class Trained(NamedTuple):
    """A trained model and what feeding it takes: the training split's normalisation, the
    spec, the class names (output i is classes[i]; None for weights written before they
    were saved) and the (H, W) of the images it was trained on (None where not recorded)."""

    model: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor | None
    spec: RunSpec
    classes: tuple[str, ...] | None
    input_size: tuple[int, int] | None = None


def check_class_names(classes: Sequence[str] | None, outputs: int,
                      asked: int | None) -> None:
    """Class names read from a file fit its classifier: one per output, or fewer where the run
    asked for more outputs than its data's classes (--num-classes); else a ValueError."""
    if classes is None:
        return
    if len(classes) > outputs or (asked is None and len(classes) != outputs):
        raise ValueError(f"{len(classes)} class names for {outputs} outputs")


def load_trained(path: Path, device: str = "cpu") -> Trained:
    """The Trained model of a run folder or of a model.safetensors written by train(), its
    checksum verified."""
    from .checkpoint import load_weights

    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.exists():
        raise ValueError(f"no {WEIGHTS} at {path}: give a finished run folder or its weights file")
    state, meta = load_weights(weights)
    if not isinstance(meta, dict) or "spec" not in meta:
        raise CheckpointError(f"{weights} has no reslab metadata (spec and normalisation); give "
                              "a model.safetensors written by `reslab train`")
    try:  # the metadata is JSON, never code, but it may still be malformed
        spec = RunSpec.from_dict(meta["spec"])
        size = meta.get("input_size")
        input_size = None if size is None else check_input_size(
            spec.model, size, f"its input_size {json.dumps(size)}")
        model = build_model(
            spec.model, num_classes=meta["num_classes"], in_channels=meta["in_channels"],
            shortcut=spec.shortcut, layout=spec.layout, layers_per_block=spec.layers_per_block,
            input_size=input_size,
        )
        model.load_state_dict(state, strict=True)
        norm = meta["normalization"]
        mean = torch.tensor(norm["mean"], dtype=torch.float32)
        std = None if norm["std"] is None else torch.tensor(norm["std"], dtype=torch.float32)
        if mean.ndim not in (1, 3) or len(mean) != meta["in_channels"]:
            raise ValueError(f"normalisation mean of shape {tuple(mean.shape)} for "
                             f"{meta['in_channels']}-channel images")
        classes = None if meta.get("classes") is None else tuple(map(str, meta["classes"]))
        check_class_names(classes, meta["num_classes"], spec.num_classes)
        if input_size is None and mean.ndim == 3:
            input_size = (int(mean.shape[1]), int(mean.shape[2]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{weights} has malformed reslab metadata or weights ({type(e).__name__}: "
            f"{error_detail(e)}); give a model.safetensors written by `reslab train`"
        ) from e
    dev = resolve_device(device)
    model = model.to(dev).to(memory_format=torch.channels_last).eval()
    mean, std = mean.to(dev), (None if std is None else std.to(dev))
    return Trained(model, mean, std, spec, classes, input_size)


def check_fits(trained: Trained, data, *, run: str, data_name: str) -> None:  # noqa: ANN001
    """The data has the run's channels, classes (in order) and, for a per-pixel mean, its image
    size; a ValueError naming both otherwise: an error measured there would be meaningless."""
    model, mean, spec, names = trained.model, trained.mean, trained.spec, trained.classes
    if data.in_channels != model.in_channels:
        raise ValueError(f"{data_name} has {data.in_channels}-channel images but {run} takes "
                         f"{model.in_channels}-channel ones")
    outputs = model.fc.out_features  # the training data's classes, unless --num-classes was given
    if data.num_classes > outputs or (spec.num_classes is None and data.num_classes != outputs):
        raise ValueError(f"{data_name} has {data.num_classes} classes but {run} was trained "
                         f"on {outputs}; evaluate it on data with the same classes")
    # Equal counts are not enough: label i must mean what it meant in training.
    if names is not None and (bad := next((i for i, name in enumerate(data.classes)
                                           if i >= len(names) or names[i] != name), None)
                              ) is not None:
        there = repr(names[bad]) if bad < len(names) else "no class"
        raise ValueError(f"{data_name}'s class {bad} is {data.classes[bad]!r} but {run} was "
                         f"trained with {there} as class {bad}; its error there would be "
                         "meaningless: evaluate on data with the training classes, in order")
    if data.image_size is not None and mean.ndim == 3 and \
            tuple(mean.shape[1:]) != data.image_size:  # a tree's views are cropped to it
        raise ValueError(f"{data_name} has {data.image_size[0]}x{data.image_size[1]} images but "
                         f"{run} was trained on {mean.shape[1]}x{mean.shape[2]} (per-pixel "
                         "mean); resize the images to the training size")
