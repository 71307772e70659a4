"""Starting a run from trained weights (`reslab train --init-from SOURCE`): a reslab run folder,
a reslab model.safetensors, or a torchvision ResNet state dict on disk (`resnet50-0676ba61.pth`,
read with torch.load(weights_only=True), so a pickle that would run code is refused unopened).

Every tensor of the body must fit the new model; the classifier (fc) is taken too when its shape
fits, else it keeps its fresh initialisation and the run says so. A stem of another number of
input channels is adapted as timm's adapt_input_conv does (1 -> 3: repeated and divided by 3;
3 -> 1: summed over the channels). The source's SHA-256 is part of the run's spec, so a fine-tune
resumed from a changed file is refused as a different run.

What a fine-tune takes from its source besides the weights (fit_to_data, with a note for each):
the normalisation the weights were trained with (recipe.normalization "source", the finetune
recipe's: a reslab run's mean and std from its weights' metadata, torchvision's ImageNet mean and
std for torchvision's weights), fitted to the new data's channels and size; and on photographs
streamed from files, torchvision's augmentation (RandomResizedCrop and flip) in place of Sec.
4.2's pad-crop-flip, which is for small images in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import WEIGHTS, CheckpointError, load_plain, load_weights

if TYPE_CHECKING:
    from .runfolder import RunSpec

# The suffixes of torchvision's (and torch.save's) weight files, read as plain state dicts.
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
CLASSIFIER = ("fc.weight", "fc.bias")
STEM = "conv1.weight"  # the first convolution: the one that sees the image's channels
# torchvision's ImageNet normalisation: the mean and std of its weights' transforms
# (torchvision.transforms._presets.ImageClassification), what its weights files were trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def source_layout(spec: RunSpec) -> tuple[RunSpec, str | None]:
    """The spec with the layout its source's weights were trained in, and a note saying so:
    torchvision's bottleneck ResNets put the stride on the 3x3 (v1.5), so a bottleneck net
    initialised from a torch state dict, its layout not given, is built that way (the shapes
    match either way: read into v1, they would compute another function without a word)."""
    from .models import IMAGENET_STAGES, model_family

    if spec.init_from is None or spec.layout is not None or \
            model_family(spec.model) != "imagenet":
        return spec, None
    depth = int("".join(c for c in spec.model if c.isdigit()) or 0)
    if IMAGENET_STAGES.get(depth, ("",))[0] != "bottleneck":
        return spec, None
    try:
        source = resolve_source(spec.init_from)
    except ValueError:  # gone: a resume's checkpoint holds the weights, its spec the layout
        return spec, None
    if source.suffix not in TORCH_SUFFIXES:
        return spec, None
    return (replace(spec, layout="v1.5"),
            f"note: {source.name} is read as a torchvision state dict: layout v1.5")


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
    body must be in the source with its shape, but for the stem's input channels
    (adapt_input_conv); the classifier is re-initialised when its shape differs (another number
    of classes)."""
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
    notes = []
    state = dict(state)
    if STEM in state and STEM in own and state[STEM].shape != own[STEM].shape:
        adapted = adapt_input_conv(state[STEM], own[STEM].shape[1])
        if adapted is not None and adapted.shape == own[STEM].shape:
            before = state[STEM].shape[1]
            how = ("summed over its input channels" if own[STEM].shape[1] == 1 else
                   f"repeated and divided by {own[STEM].shape[1] / before:g}")
            notes.append(f"stem adapted from {before} to {own[STEM].shape[1]} input channel(s): "
                         f"{STEM} {how}, as timm's adapt_input_conv")
            state[STEM] = adapted
    for k, v in own.items():
        if k in CLASSIFIER or k not in state:
            continue
        if state[k].shape != v.shape:
            hint = (" (another stem: its kernel, not only its channels, differs)" if k == STEM else
                    "; a bottleneck net from torchvision needs --layout v1.5"
                    if "conv" in k else "")
            raise ValueError(f"--init-from {source} does not fit this model: {k} is "
                             f"{tuple(state[k].shape)} there, {tuple(v.shape)} here{hint}")
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


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor | None:
    """A first convolution's weight (O, I, kH, kW) for `channels` input channels, as timm's
    adapt_input_conv: to 1, summed over the I channels (a grey image in every channel gives the
    same output); from I to more, repeated and scaled by I / channels (the same output for an
    image whose channels are equal). None where the kernel differs otherwise."""
    if weight.ndim != 4 or channels < 1:
        return None
    w = weight.float()
    if channels == 1:
        w = w.sum(1, keepdim=True)
    else:
        repeat = -(-channels // w.shape[1])
        w = w.repeat(1, repeat, 1, 1)[:, :channels] * w.shape[1] / channels
    return w.to(weight.dtype)


def fit_to_data(spec: RunSpec, *, augmentations: tuple[str, ...], channels: int,
                size: tuple[int, int],
                recorded: dict[str, Any] | None = None, resuming: bool = False,
                ) -> tuple[RunSpec, tuple[torch.Tensor, torch.Tensor | None] | None, list[str]]:
    """A run's spec as it trains on its data (what its weights' metadata records), the
    normalisation to train with when it is the source's (None: the data's statistics, from the
    returned spec's recipe), and notes for the user.

    - A fine-tune (init_from) on data that cannot take pad-crop-flip (photographs streamed from
      files: the data's `augmentations`) whose recipe says pad-crop-flip (the finetune
      recipe's, Sec. 4.2's for small images in memory) takes torchvision's augmentation,
      RandomResizedCrop and flip: the standard fine-tuning one.
    - recipe.normalization "source": the source weights' normalisation (source_normalization)
      fitted to `channels` and `size` (fit_normalization); where it has none or does not fit, or
      without a source, the data's per-pixel mean (the paper's), with a note. A resumed run
      (`resuming`: a checkpoint exists) normalises as its start did: the checkpoint's
      `recorded` normalisation, or the data's when it holds none.
    """
    recipe, notes = spec.recipe, []
    if spec.init_from is not None and recipe.augmentation == "pad-crop-flip" and \
            "torchvision" in augmentations:
        recipe = replace(recipe, augmentation="torchvision")
        notes.append("augmentation: torchvision's RandomResizedCrop 224 and flip for a fine-tune "
                     "on photographs (pad-crop-flip is for small images in memory; "
                     "--augmentation scale gives Sec. 3.4's)")
    norm = None
    if recipe.normalization == "source":
        if recorded is not None:
            norm = (recorded["mean"], recorded["std"])
        elif spec.init_from is None:
            notes.append("normalization source without --init-from: the data's per-pixel mean")
        elif not resuming:
            found = source_normalization(spec.init_from)
            fitted = None if found is None else fit_normalization(*found[:2], channels, size)
            if fitted is None:
                what = "records none" if found is None else f"has {found[2]}, which does not " \
                    f"fit {channels}-channel images"
                notes.append(f"normalised with this data's per-pixel mean: the source {what}")
            else:
                norm = fitted[:2]
                how = f" ({fitted[2]})" if fitted[2] else ""
                notes.append(f"normalised as the source was trained: {found[2]}{how}, not this "
                             "data's statistics")
        if norm is None:
            recipe = replace(recipe, normalization="pixel")
    return replace(spec, recipe=recipe), norm, notes


def source_normalization(init_from: str) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """The normalisation a source's weights were trained with (mean, std or None, in x / 255
    units, and what it is): a reslab run's from its weights' metadata; torchvision's weights by
    name, their transforms'; a torchvision state dict on disk (.pth), torchvision's ImageNet
    mean and std. None where the source records none."""
    from .pretrained import TORCHVISION

    if str(init_from).startswith(TORCHVISION) and not Path(init_from).exists():
        from .pretrained import torchvision_weights

        t = torchvision_weights(str(init_from)).transforms()
        return (torch.tensor(t.mean, dtype=torch.float32), torch.tensor(t.std, dtype=torch.float32),
                "torchvision's, its weights' transforms' mean and std")
    path = resolve_source(init_from)
    if path.suffix in TORCH_SUFFIXES:
        return (torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD),
                "torchvision's ImageNet mean and std, as torchvision's weights files are")
    _, meta = load_weights(path)
    norm = meta.get("normalization") if isinstance(meta, dict) else None
    try:
        mean = torch.tensor(norm["mean"], dtype=torch.float32)
        std = None if norm["std"] is None else torch.tensor(norm["std"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    if mean.ndim not in (1, 3) or not len(mean) or (
            std is not None and std.shape != mean.shape[:1]):
        return None
    kind = "per-pixel mean" if mean.ndim == 3 else "per-channel mean"
    return mean, std, f"its run's {kind}{' and std' if std is not None else ''}"


def fit_normalization(mean: torch.Tensor, std: torch.Tensor | None, channels: int,
                      size: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """A normalisation fitted to `channels`-channel images of `size`, and what was changed: a
    per-pixel mean of another size reduced to per-channel (as predict and the test protocols
    do); one channel repeated to `channels`, or channels averaged to one (as the stem is
    adapted). None where the channels cannot be reconciled."""
    done = []
    if mean.ndim == 3 and tuple(mean.shape[1:]) != tuple(size):
        done.append(f"reduced to per-channel: {mean.shape[1]}x{mean.shape[2]} there, "
                    f"{size[0]}x{size[1]} here")
        mean = mean.mean((1, 2))
    if len(mean) != channels:
        if len(mean) == 1:
            mean = mean.expand(channels, *mean.shape[1:]).contiguous()
            std = None if std is None else std.expand(channels).contiguous()
            done.append(f"its 1 channel repeated to {channels}")
        elif channels == 1:
            done.append(f"its {len(mean)} channels averaged to 1")
            mean = mean.mean(0, keepdim=True)
            std = None if std is None else std.mean(0, keepdim=True)
        else:
            return None
    return mean.float(), None if std is None else std.float(), "; ".join(done)


def check_init(path: str, sha256: str | None) -> Path:
    """The source of a spec's init_from, checked against the SHA-256 the run was started with."""
    source = resolve_source(path)
    if sha256 is not None and file_digest(source) != sha256:
        raise ValueError(f"--init-from {source} has changed since this run started from it "
                         f"(SHA-256 {sha256[:12]}... then); restore it, or use a new --out")
    return source
