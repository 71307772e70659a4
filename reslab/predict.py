"""`reslab predict`: the top-k classes of image files, from a trained run, its model.safetensors
or its exported .onnx, each image prepared exactly as that run's evaluation prepares its data.

Two kinds of run, as evaluation knows them: nets trained on images held in memory (CIFAR-style,
Sec. 4.2) see an image as trained (its channels made the run's, scaled to the training size if
it differs); nets trained on a streamed tree of photographs (Sec. 3.4's scale augmentation) see
the run's test protocol: the centre 224 crop of the image with its shorter side at 256, or the
ten crops, scores averaged (protocols.evaluate_tree's order of operations). A bad file is
reported by name and the others are still predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError
from .data.folder import BAD_IMAGE, IMAGE_SUFFIXES, decode_image, is_listed
from .data.photo_augment import (
    CROP,
    MULTI_SCALES,
    TEST_SIZE,
    centre_view,
    check_size,
    resize_shorter,
    ten_views,
)
from .data.protocols import PROTOCOLS, prepare_views
from .data.tree import decode_rgb
from .runtime import autocast

if TYPE_CHECKING:
    from .trained import Trained



@dataclass
class Predictor:
    """What predicting takes: a function from prepared uint8 images (N, C, H, W) to logits (and
    optionally to pooled features), and how images are prepared for it."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor] | None
    head: Callable[[torch.Tensor], torch.Tensor] | None  # pooled features to logits
    classes: tuple[str, ...] | None
    in_channels: int
    input_size: tuple[int, int]
    photos: bool  # prepared by the Sec. 3.4 test protocol, not as trained in memory
    name: str
    any_size: bool = True  # takes whole images of any size (not an export of fixed size)


def is_model_source(path: Path) -> bool:
    """Whether an argument of `predict` names a model rather than images: a run folder, a
    weights or ONNX file (by its bytes), a released name or torchvision:WEIGHTS."""
    from .checkpoint import WEIGHTS, file_kind
    from .pretrained import is_pretrained

    path = Path(path)
    if path.is_dir():
        return (path / WEIGHTS).exists() or (path / "recipe.json").exists()
    if path.exists():
        return file_kind(path) in ("safetensors", "onnx", "torch-export", "torch-save")
    return is_pretrained(path)


def open_predictor(source: Path | Sequence[Path], *, device: str = "cpu",
                   precision: str | None = None) -> Predictor:
    """A Predictor for a run folder, a model.safetensors, a released name or an .onnx exported
    from one; for several runs, their ensemble (ensemble.py: softmax scores averaged)."""
    from .checkpoint import file_kind

    sources = [Path(source)] if isinstance(source, str | Path) else [Path(s) for s in source]
    for src in sources:
        kind = "folder" if src.is_dir() else file_kind(src)
        if kind == "image":
            raise ValueError(f"{src} is an image, not a model: the model comes first, then the "
                             "images (reslab predict RUN IMAGE ...)")
        if src.suffix == ".onnx" or kind == "onnx":  # by its bytes too: a name without suffix
            if len(sources) > 1:
                raise ValueError(f"{src} is an ONNX file: an ensemble takes run folders, "
                                 "weights files or released names")
            if precision not in (None, "fp32"):
                raise ValueError(f"--precision {precision}: an ONNX model runs in the precision "
                                 "it was exported in (fp32)")
            from .export import load_onnx

            onnx = load_onnx(src)
            return Predictor(onnx, None, None, onnx.classes, onnx.in_channels, onnx.input_size,
                             onnx.photos, src.name, any_size=False)
    from .pretrained import load_source

    members = [load_source(src, device=device) for src in sources]
    if len(members) == 1:
        return _torch_predictor(members[0], precision, members[0].spec.model)
    from .ensemble import ensemble

    trained = ensemble(members, sources, precision=precision)
    # fp32 outside: each member runs in its own precision (or --precision's) inside.
    return _torch_predictor(trained, "fp32", f"ensemble of {len(members)}")


def _torch_predictor(trained: Trained, precision: str | None, name: str) -> Predictor:
    from .export import input_size_of, trained_on_photos

    model, mean, std, spec = trained.model, trained.mean, trained.std, trained.spec
    photos, size = trained_on_photos(trained), input_size_of(trained)
    precision = precision or spec.recipe.precision
    dev = next(model.parameters()).device

    def prepared(x: torch.Tensor) -> torch.Tensor:  # as the run's evaluation prepares views
        return prepare_views(x, mean, std, dev, torch.channels_last)

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, precision):
            return model(prepared(x)).float().cpu()

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, precision):
            return model.forward_features(prepared(x)).float().cpu()

    @torch.no_grad()
    def head(f: torch.Tensor) -> torch.Tensor:
        return model.fc(f.to(dev)).float().cpu()

    return Predictor(logits, features, head, trained.classes, model.in_channels, size,
                     photos, name)


def list_images(paths: Sequence[Path]) -> list[Path]:
    """The image files named, and those under the folders named (recursively, sorted); a
    clear error for a path that does not exist or a folder without images."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and is_listed(p, path))
            if not found:
                raise DataError(f"{path} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"no such image or folder: {path}")
    return files


def _as_trained(path: Path, predictor: Predictor) -> torch.Tensor:
    """uint8 (C, H, W) of a small image as a memory-trained run's evaluation sees its data: the
    run's channels (RGB to grey by PIL's ITU-R 601 luma, grey to RGB by repetition), at the
    training size (antialiased bilinear when the file's differs)."""
    from PIL import Image

    array = decode_image(path)
    if predictor.in_channels == 1 and array.ndim == 3:
        array = np.asarray(Image.fromarray(array).convert("L"))
    image = torch.from_numpy(np.array(array))
    image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
    if predictor.in_channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] != predictor.in_channels:
        raise DataError(f"{path} has {image.shape[0]} channels; the model takes "
                        f"{predictor.in_channels}")
    if tuple(image.shape[-2:]) != predictor.input_size:
        image = F.interpolate(image[None].float(), size=predictor.input_size, mode="bilinear",
                              antialias=True, align_corners=False)[0].round().clamp(0, 255)
        image = image.to(torch.uint8)
    return image.contiguous()


def _views(path: Path, predictor: Predictor, protocol: str) -> torch.Tensor:
    """(V, C, H, W) uint8: the views of one image its run's evaluation would score."""
    if not predictor.photos:
        return _as_trained(path, predictor)[None]
    image = decode_rgb(str(path))
    check_size(image, str(path))  # a 1x5000 strip scaled to a 256 shorter side: gigabytes
    if protocol == "10-crop":
        return ten_views(image, TEST_SIZE, CROP)
    return centre_view(image, TEST_SIZE, CROP)[None].contiguous()


def _multi_scale(path: Path, predictor: Predictor) -> torch.Tensor:
    """Sec. 3.4's fully convolutional testing of one image: softmax scores of the whole image
    and its flip at each shorter side of {224, 256, 384, 480, 640}, averaged (as
    protocols.evaluate_tree): (num_classes,)."""
    image = decode_rgb(str(path))
    check_size(image, str(path))
    per_scale = []
    for side in MULTI_SCALES:
        x = resize_shorter(image, side).contiguous()[None]
        probs = predictor.logits(torch.cat([x, x.flip(-1)])).softmax(1)
        per_scale.append(probs.mean(0))
    return torch.stack(per_scale).mean(0)


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, float]]  # (class index, probability), best first
    features: np.ndarray | None = None


def predict(predictor: Predictor, files: Sequence[Path], *, top_k: int = 5,
            protocol: str = "centre", batch_size: int = 64, features: bool = False
            ) -> Iterator[Prediction | tuple[str, str]]:
    """For each file in order, its Prediction, or (path, message) for a bad one."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol != "centre" and not predictor.photos:
        raise ValueError(f"--protocol {protocol} is for runs trained on photographs (Sec. 3.4); "
                         f"{predictor.name} was trained on images as they are (Sec. 4.2)")
    if protocol == "multi-scale" and not predictor.any_size:
        raise ValueError(f"--protocol multi-scale feeds whole images of several sizes; "
                         f"{predictor.name} takes {predictor.input_size[0]}x"
                         f"{predictor.input_size[1]} only: use the run folder")
    if protocol == "multi-scale" and features:
        raise ValueError("--features with --protocol multi-scale: the features are of one view; "
                         "use centre or 10-crop")
    if features and predictor.features is None:
        raise ValueError("--features needs the PyTorch model (a run folder or model.safetensors), "
                         "not an exported .onnx")
    if protocol == "multi-scale":  # whole images of different sizes: one at a time
        for path in files:
            try:
                probs = _multi_scale(path, predictor)
            except DataError as e:
                yield str(path), str(e)
                continue
            best = probs.topk(min(top_k, len(probs)))
            yield Prediction(str(path), list(zip(best.indices.tolist(), best.values.tolist(),
                                                 strict=True)))
        return
    for start in range(0, len(files), batch_size):
        good, views = [], []
        for path in files[start:start + batch_size]:
            try:
                views.append(_views(path, predictor, protocol))
                good.append(path)
            except DataError as e:
                yield str(path), str(e)
            except BAD_IMAGE as e:
                yield str(path), f"cannot decode image {path}: {e}; fix or delete it"
        if not views:
            continue
        x = torch.stack(views)  # (B, V, C, H, W)
        b, v = x.shape[:2]
        pooled = None
        if features:  # one forward pass: the views' features, then the classifier on them
            f = predictor.features(x.flatten(0, 1))
            logits = predictor.head(f)
            pooled = f.view(b, v, -1).mean(1).numpy()  # an image's: the mean of its views'
        else:
            logits = predictor.logits(x.flatten(0, 1))
        probs = logits.softmax(1).view(b, v, -1).mean(1)
        k = min(top_k, probs.shape[1])
        best = probs.topk(k, dim=1)
        for i, path in enumerate(good):
            top = list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True))
            yield Prediction(str(path), top, None if pooled is None else pooled[i])


def class_name(predictor: Predictor, index: int) -> str:
    if predictor.classes is not None and index < len(predictor.classes):
        return predictor.classes[index]
    return str(index)
