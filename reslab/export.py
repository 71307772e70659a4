"""A trained run as one self-contained file: ONNX (for ONNX Runtime and other engines) or a
torch.export program (.pt2), with BatchNorm folded into the convolutions.

Both take the images as the user has them, uint8 (N, C, H, W), 0-255, any batch N, and hold the
run's normalisation (the training split's per-pixel or per-channel mean, and std if any) inside
the graph, so no caller can feed them differently from how the run evaluated. The ONNX file
carries the class names, input size and channels, the input's format and the run's spec in its
metadata_props; OnnxModel reads them back and runs the file on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import ResidualBlock
from .checkpoint import WEIGHTS, CheckpointError, atomic_write
from .data.stats import mean_at as stats_mean_at
from .models import check_input_size, model_family
from .runfolder import is_run_file
from .runtime import require
from .trained import Trained, check_class_names, load_trained

__all__ = ["FORMATS", "OnnxModel", "export_onnx", "export_program", "export_run",
           "fold_batch_norm", "input_size_of", "load_onnx", "mean_at", "onnx_metadata",
           "trained_on_photos"]

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}  # format -> default file suffix
INPUT_NAME, OUTPUT_NAME = "images", "logits"
META = "reslab."  # prefix of the metadata_props keys this module writes
PROGRAM_META = "reslab.json"  # the .pt2's extra file with the same metadata
# The opset torch 2.14's dynamo exporter writes; ONNX Runtime runs it from 1.17 on.
OPSET = 20
EXAMPLE_BATCH = 2  # export traces at 2: a size-1 example would specialise the batch to 1


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every BatchNorm folded into the conv before it (the stem,
    each block's layers and option B/C projections); the caller's model is left untouched."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()

    def fold(owner: nn.Module, conv: str, bn: str) -> None:
        c, b = getattr(owner, conv, None), getattr(owner, bn, None)  # none on the MLP/LSTM twins
        if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            setattr(owner, conv, fuse_conv_bn_eval(c, b))
            setattr(owner, bn, nn.Identity())

    fold(m, "conv1", "bn1")
    for block in m.modules():
        if isinstance(block, ResidualBlock):
            for i in range(1, block.num_layers + 1):
                fold(block, f"conv{i}", f"bn{i}")
            if isinstance(block.downsample, nn.Sequential) and len(block.downsample) == 2:
                fold(block.downsample, "0", "1")
    return m


class _FromUint8(nn.Module):
    """uint8 images in, logits out: the run's evaluation (data.normalize) then the network."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor | None) -> None:
        super().__init__()
        self.net = net
        # Buffers, so the exported graph holds them as initializers named "mean" and "std".
        self.register_buffer("mean", mean if mean.ndim == 3 else mean[:, None, None])
        self.register_buffer("std", None if std is None else std[:, None, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255 - self.mean
        if self.std is not None:
            x = x / self.std
        return self.net(x)


def trained_on_photos(trained: Trained) -> bool:
    """Whether the run trained on photographs (Sec. 3.4's augmentation), so that images are
    prepared by its test protocol (centre crop) rather than as trained in memory."""
    return trained.spec.recipe.augmentation != "pad-crop-flip"


def input_size_of(trained: Trained, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) the export fixes: `input_size`, else the run's training size where recorded, the
    per-pixel mean's, or the family's (Sec. 4.2: 32x32 on CIFAR; Sec. 3.4: the 224x224 crop on
    ImageNet and for any run trained on photographs)."""
    if input_size is not None:
        shown = " ".join(map(str, input_size)) if isinstance(input_size, list | tuple) \
            else repr(input_size)
        return check_input_size(trained.spec.model, input_size, f"--input-size {shown}")
    if trained.input_size is not None:
        return int(trained.input_size[0]), int(trained.input_size[1])
    if trained.mean.ndim == 3:
        return int(trained.mean.shape[1]), int(trained.mean.shape[2])
    large = trained_on_photos(trained) or model_family(trained.spec.model) == "imagenet"
    return (224, 224) if large else (32, 32)


def mean_at(trained: Trained, size: tuple[int, int]) -> torch.Tensor:
    """The mean the export subtracts at `size`, as the run's evaluation does (stats.mean_at)."""
    return stats_mean_at(trained.mean.detach().cpu().float(), size)


def _wrap(trained: Trained, size: tuple[int, int]) -> _FromUint8:
    net = fold_batch_norm(trained.model).cpu().to(memory_format=torch.contiguous_format)
    std = None if trained.std is None else trained.std.detach().cpu().float()
    return _FromUint8(net, mean_at(trained, size), std).eval()


def _channels(trained: Trained) -> int:
    return int(trained.mean.shape[0])


def _num_classes(trained: Trained) -> int:
    return int(trained.model.fc.out_features)


def onnx_metadata(trained: Trained, size: tuple[int, int]) -> dict[str, str]:
    """The metadata an export carries: enough to feed it and to name its outputs."""
    from . import __version__

    c = _channels(trained)
    kind = "RGB" if c == 3 else "greyscale" if c == 1 else f"{c}-channel"
    return {
        f"{META}classes": json.dumps(None if trained.classes is None else list(trained.classes)),
        f"{META}input_size": json.dumps(list(size)),
        f"{META}in_channels": str(c),
        f"{META}num_classes": str(_num_classes(trained)),
        f"{META}input_format": (
            f"'{INPUT_NAME}': uint8 (N, {c}, {size[0]}, {size[1]}) {kind} images, 0-255, "
            f"channels first, any batch N; the training split's normalisation is inside the "
            f"graph. '{OUTPUT_NAME}': float32 (N, {_num_classes(trained)}), output i is class i"
        ),
        f"{META}normalization": ("per-pixel mean" if mean_at(trained, size).ndim == 3 else
                                 "per-channel mean") + (" and std" if trained.std is not None
                                                        else ""),
        f"{META}photos": json.dumps(trained_on_photos(trained)),
        f"{META}version": __version__,
        f"{META}spec": json.dumps(trained.spec.as_dict(), sort_keys=True),
    }


def _traced(trained: Trained, size: tuple[int, int]
            ) -> tuple[_FromUint8, tuple[torch.Tensor], dict[str, Any]]:
    """The uint8-in wrapper, an example input and its dynamic batch, for either exporter."""
    example = torch.zeros(EXAMPLE_BATCH, _channels(trained), *size, dtype=torch.uint8)
    return _wrap(trained, size), (example,), {INPUT_NAME: {0: torch.export.Dim("N", min=1)}}


def _check_writable(out: Path, overwrite: bool = False) -> Path:
    """A clear error before any work for an output that cannot (or must not) be written: an
    existing file is replaced only when `overwrite` says so, and a run's own files (its
    weights, metrics, recipe, checkpoints, ...) never are, since resuming and evaluating read
    them back."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name for the export")
    if not out.parent.is_dir():
        raise ValueError(f"no folder {out.parent} for {out}; create it or give another path")
    if is_run_file(out) or is_run_file(out.resolve()):
        raise ValueError(f"{out} is one of the run folder's own files, which an export never "
                         "replaces; give another --out (e.g. model.onnx)")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"{out} exists; give another --out, or --overwrite to replace it")
    # The mode bits, not os.access: root may write anything, but a write-protected file is the
    # user saying "keep this" (and the atomic rename would replace it regardless).
    if out.exists() and not out.stat().st_mode & 0o222:
        raise ValueError(f"{out} exists and is not writable; remove it or give another path")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {out.parent}; give a writable path")
    return out


def _write(out: Path, data: bytes) -> None:
    try:
        atomic_write(out, data)  # a kill mid-write leaves the old file or the new, never half
    except CheckpointError as e:
        raise ValueError(f"cannot write {out}: {e.__cause__ or e}") from e


def export_onnx(trained: Trained, out: Path, *, input_size: tuple[int, int] | None = None,
                overwrite: bool = False) -> Path:
    """Write `trained` as a self-contained ONNX model to `out` and return the path.

    Input "images": uint8 (N, C, H, W), 0-255, dynamic N, H and W fixed (input_size_of);
    output "logits": float32 (N, num_classes). Cast, /255, minus the mean, /std, then the
    BN-folded network. The file passes onnx.checker's full check before it is written."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")  # torch's dynamo exporter writes through it

    out = _check_writable(Path(out), overwrite)
    size = input_size_of(trained, input_size)
    wrapper, example, dynamic = _traced(trained, size)
    # The dynamo exporter (on torch.export, via onnxscript): the TorchScript one still runs in
    # this torch but is deprecated, and its graph is twice the size (option A's padding becomes
    # ConstantOfShape/Concat chains); this one's graph passes the full check, batch symbolic.
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            wrapper, example, dynamo=True, dynamic_shapes=dynamic, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=OPSET, optimize=True, verbose=False)
    proto = onnx_program.model_proto
    meta = onnx_metadata(trained, size)
    proto.doc_string = f"reslab {trained.spec.model}: {meta[META + 'input_format']}"
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    _write(out, proto.SerializeToString())
    return out


def export_program(trained: Trained, out: Path, *, input_size: tuple[int, int] | None = None,
                   overwrite: bool = False) -> Path:
    """Write `trained` as a torch.export program (.pt2, torch.export.save) to `out`: the same
    uint8-in graph as export_onnx, a dynamic batch; the metadata in its extra file
    "reslab.json". torch.export.load(out).module()(images_uint8) gives the logits."""
    out = _check_writable(Path(out), overwrite)
    size = input_size_of(trained, input_size)
    wrapper, example, dynamic = _traced(trained, size)
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    meta = {k.removeprefix(META): v for k, v in onnx_metadata(trained, size).items()}
    torch.export.save(program, buffer, extra_files={PROGRAM_META: json.dumps(meta)})
    _write(out, buffer.getvalue())
    return out


_EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": export_onnx, "torch-export": export_program,
}


def export_run(source: Path, fmt: str, out: Path | None = None, *,
               input_size: tuple[int, int] | None = None, overwrite: bool = False) -> Path:
    """Export a finished run folder (or its weights file) as `fmt` ("onnx" or "torch-export");
    by default to model.onnx / model.pt2 beside the weights (input_size: see input_size_of).
    An existing `out` is replaced only with `overwrite`; the weights and the run's own files
    never are."""
    if fmt not in _EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    source = Path(source)
    weights = source / WEIGHTS if source.is_dir() else source
    out = weights.with_suffix(FORMATS[fmt]) if out is None else Path(out)
    if out.resolve() == weights.resolve():
        raise ValueError(f"--out {out} is the weights being exported; give another path")
    _check_writable(out, overwrite)  # before loading: a bad --out fails at once
    return _EXPORTERS[fmt](load_trained(source), out, input_size=input_size, overwrite=overwrite)


class OnnxModel:
    """An .onnx file written by export_onnx, run on ONNX Runtime's CPU provider.

    `model(images)` takes uint8 (N, C, H, W) images (a torch tensor) and returns float32
    logits; `.classes`, `.input_size` (H, W), `.in_channels`, `.num_classes`, `.photos` (the
    run trained on photographs: prepare images by its centre crop) and `.metadata` come from
    the file."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        ort = require("onnxruntime", "running an ONNX model")

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"no ONNX model at {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{self.path} is not a loadable ONNX model ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            classes = json.loads(meta[f"{META}classes"])
            self.input_size = tuple(int(s) for s in json.loads(meta[f"{META}input_size"]))
            self.in_channels = int(meta[f"{META}in_channels"])
            self.num_classes = int(meta[f"{META}num_classes"])
            self.photos = bool(json.loads(meta[f"{META}photos"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path} is an ONNX model but not one exported by reslab (its "
                             f"metadata lacks or garbles {e}); export a run with `reslab export "
                             "RUN --format onnx`") from e
        self.classes = None if classes is None else tuple(map(str, classes))
        self.metadata: dict[str, Any] = {k.removeprefix(META): v for k, v in meta.items()
                                         if k.startswith(META)}
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
            raise ValueError(f"{self.path} does not take one uint8 input; export it again with "
                             "this reslab")
        self._input = inputs[0].name
        self._check_metadata(meta, inputs[0].shape, self.session.get_outputs()[0].shape)

    def _check_metadata(self, meta: dict[str, str], shape: list, out_shape: list) -> None:
        """The metadata, validated like command-line values and against the graph it
        describes: a size the net can take, the graph's own channels, size and outputs, a
        class name per output."""
        try:
            spec = json.loads(meta[f"{META}spec"])
            self.input_size = check_input_size(
                spec["model"], json.loads(meta[f"{META}input_size"]),
                f"its input_size {meta[f'{META}input_size']}")
            graph = [d if isinstance(d, int) else None for d in (*shape[1:], out_shape[-1])]
            said = [self.in_channels, *self.input_size, self.num_classes]
            if len(graph) != 4 or any(g is not None and g != m for g, m in zip(graph, said,
                                                                                strict=True)):
                raise ValueError(f"its in_channels, input_size and num_classes {said} differ "
                                 f"from its graph's {graph}")
            check_class_names(self.classes, self.num_classes, spec.get("num_classes"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path} has malformed reslab metadata ({e}); export the run "
                             "again with `reslab export RUN --format onnx`") from e

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *self.input_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.path.name} takes uint8 (N, {', '.join(map(str, expected))}) "
                             f"images, got {images.dtype} {tuple(images.shape)}")
        x = images.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self._input: x})[0])

    def __repr__(self) -> str:
        return (f"OnnxModel({str(self.path)!r}, input_size={self.input_size}, in_channels="
                f"{self.in_channels}, classes={len(self.classes) if self.classes else None})")


def load_onnx(path: Path, *, threads: int | None = None) -> OnnxModel:
    """An exported .onnx file, ready to classify uint8 images (OnnxModel)."""
    return OnnxModel(path, threads=threads)
