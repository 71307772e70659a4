"""Weights by name: reslab's released nets and torchvision's ImageNet ResNets.

Released weights are the final weights of committed runs (results/.../model.safetensors, in the
repository), named timm's way, `architecture.tag` (`resnet56.cifar10jpeg_16k`). Each entry of
RELEASES records what the run's own files say (recipe.json, env.json, summary.json,
metrics.jsonl): the data, the recipe, the iterations, the commit and hardware it ran on, and its
final test error; its SHA-256 is checked on every load.

`torchvision:ResNet50_Weights.IMAGENET1K_V1` goes through torchvision's weights API: its URL,
torch.hub's cache (`$TORCH_HOME/hub/checkpoints`) and download with hash check, and the
weights' own metadata: their transforms' normalisation and crop size, their 1,000 category
names. torchvision's bottleneck ResNets are v1.5 (stride on the 3x3) with projection shortcuts
(option B), so they are built that way. Offline, the cache is used when the file is there; when
it is not, the error names the file and the folder to put it in.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .checkpoint import CheckpointError
from .finetune import file_digest
from .models import IMAGENET_STAGES, build_model, default_shortcut
from .recipes import get_recipe
from .runfolder import RunSpec
from .trained import Trained, load_trained

TORCHVISION = "torchvision:"
REPOSITORY = Path(__file__).resolve().parent.parent  # the checkout the weights are committed in
_RUNS = "results/cifar10-jpeg/runs"
_JPEG_LIMITS = ("Trained and tested on a JPEG re-encoding of CIFAR-10 (quality about 75), not the "
                "original pixels: expect other errors on CIFAR-10 itself. One seed (0): the "
                "spread between seeds is not measured here. 32x32 inputs, 10 classes.")


@dataclass(frozen=True)
class Release:
    """A released net: its weights file in the repository and the facts of the run."""

    name: str
    file: str  # relative to the repository root
    sha256: str
    data: str
    recipe: str  # the command's recipe, in words
    iterations: int
    commit: str  # env.json's: the commit the run started at
    hardware: str
    test_error: float  # final, on the 10,000 test images (summary.json), in the run's bf16
    test_error_fp32: float  # the same in float32 (results/cifar10-jpeg/releases/fp32-eval.json)
    train_error: float  # final, on the augmented batches of the last 1% (summary.json)
    wall_time_s: float
    command: str
    limits: str = _JPEG_LIMITS

    @property
    def model(self) -> str:
        return self.name.split(".")[0]


def _cifar10_jpeg(model: str, iterations: int, sha256: str, test_error: float,
                  test_error_fp32: float, train_error: float, commit: str, cpu: str,
                  wall_time_s: float, command: str) -> Release:
    k = iterations // 1000
    warmup = " with Sec. 4.2's warm-up (lr 0.01 until training error < 80%)" \
        if model == "resnet110" else ""
    return Release(
        name=f"{model}.cifar10jpeg_{k}k", file=f"{_RUNS}/{model}-{iterations}it-seed0/"
        "model.safetensors", sha256=sha256, data="cifar10-jpeg (CIFAR-10, JPEG copy)",
        recipe=f"Sec. 4.2's cifar10 recipe scaled to {iterations:,} iterations: SGD lr 0.1, "
        f"momentum 0.9, weight decay 1e-4, batch 128, lr /10 at {iterations // 2:,} and "
        f"{3 * iterations // 4:,}; pad 4, random 32x32 crop and flip; per-pixel mean; bf16; "
        f"seed 0{warmup}", iterations=iterations, commit=commit,
        hardware=f"{cpu}, 2 cores, CPU only", test_error=test_error,
        test_error_fp32=test_error_fp32, train_error=train_error,
        wall_time_s=wall_time_s, command=command)


_FIG6 = ("reslab reproduce fig6 --data cifar10-jpeg --out results/cifar10-jpeg/fig6-16k --runs "
         "results/cifar10-jpeg/runs --depths 20 56 --iterations 16000")
_TABLE6 = ("reslab reproduce table6 --data cifar10-jpeg --out results/cifar10-jpeg/table6-16k "
           "--runs results/cifar10-jpeg/runs --depths 20 32 44 56 110 --iterations 16000")
_TABLE6_64K = ("reslab reproduce table6 --data cifar10-jpeg --out results/cifar10-jpeg/table6-64k "
               "--runs results/cifar10-jpeg/runs --depths 20 --iterations 64000")
_EPYC, _XEON = "AMD EPYC", "Intel(R) Xeon(R) Processor"
_B2B = "b2bdd58fdd489af7dffa7fd5445ca9adae808653"
_E1A = ("e1a3c172ad50973504fad0b810cad967f2f9cd22 (resumed at 1957568, 389d17f, bcefa29, 7ab6bea: "
        "env.json)")

# From each run's summary.json and env.json (the errors equal metrics.jsonl's last evaluation).
RELEASES: dict[str, Release] = {r.name: r for r in (
    _cifar10_jpeg("resnet20", 64_000,
                  "e96669c01902c331ce5b196b829cf5e5c2fdf26567a39608cb91ee48f976eaf3",
                  0.1188, 0.1191, 0.0165771484375, _E1A, _EPYC, 23061, _TABLE6_64K),
    _cifar10_jpeg("resnet20", 16_000,
                  "a76939f7ead45e3988121ae1ebb4a2a6b4e59050b2ce9443e0d7ae1391a4307f",
                  0.1383, 0.1377, 0.085302734375, _B2B, _EPYC, 2266, _FIG6),
    _cifar10_jpeg("resnet32", 16_000,
                  "da7da3b6844835c68a258a6ece8b02130e79914c1824c5fac748628bd920b4ef",
                  0.1344, 0.1339, 0.063427734375, _B2B, _XEON, 3264, _TABLE6),
    _cifar10_jpeg("resnet44", 16_000,
                  "0819cc6b6128d57f8e89eeaa2fe6187c85939a506b436c7fe416aff59601fe1c",
                  0.1294, 0.1301, 0.063671875, _B2B, _XEON, 4275, _TABLE6),
    _cifar10_jpeg("resnet56", 16_000,
                  "d336cc40dfc5358656b30a3299e2d9594732282a14f0b87d4362ad6842eec1bf",
                  0.1698, 0.1694, 0.114013671875, _B2B, _XEON, 4215, _FIG6),
    _cifar10_jpeg("resnet110", 16_000,
                  "9b69434dd70d15e4839b963f85ed445130705c59648706ab1485e9a785f49ff9",
                  0.1245, 0.1243, 0.049658203125, _B2B, _XEON, 9266, _TABLE6),
    _cifar10_jpeg("plain20", 16_000,
                  "805295782aa0bc99bc7553adb0ce3237893a6f382679dbb40c1dff1182632351",
                  0.1509, 0.1505, 0.10869140625, _B2B, _EPYC, 3178, _FIG6),
    _cifar10_jpeg("plain56", 16_000,
                  "8d30c93b3ab53d50df2522ada83e9055b519fde564f54602b615ada6e4e83c36",
                  0.3274, 0.3264, 0.331103515625, _B2B, _EPYC, 8933, _FIG6),
)}


def list_pretrained() -> list[str]:
    """The released names, then how torchvision's are named."""
    return list(RELEASES)


def is_pretrained(name: str | os.PathLike) -> bool:
    """Whether `name` names released or torchvision weights (not a path)."""
    text = str(name)
    return text in RELEASES or text.startswith(TORCHVISION)


def default_release(model: str) -> str:
    """The released name torch.hub's pretrained=True gives for `model`: its longest run."""
    found = [r for r in RELEASES.values() if r.model == model]
    if not found:
        have = sorted({r.model for r in RELEASES.values()})
        raise ValueError(f"no released weights for {model}; released: {', '.join(have)} "
                         "(reslab info --pretrained), or train it: reslab train " + model)
    return max(found, key=lambda r: r.iterations).name


def card(name: str) -> str:
    """The model card of a released net, in markdown."""
    r = _release(name)
    return (f"# {r.name}\n\n"
            f"{r.model} ({'plain' if r.model.startswith('plain') else 'residual'} net of Sec. "
            f"4.2) trained on {r.data}.\n\n"
            f"- final test error: {100 * r.test_error:.2f}% on the 10,000 test images as "
            f"trained (bf16; final training error {100 * r.train_error:.2f}%); in float32 "
            f"{100 * r.test_error_fp32:.2f}% (`reslab eval {r.name} --data cifar10-jpeg "
            "--precision fp32`), free of bf16's rounding, which differs between CPUs\n"
            f"- recipe: {r.recipe}\n- iterations: {r.iterations:,}\n"
            f"- command: `{r.command}`\n- commit: {r.commit}\n"
            f"- hardware: {r.hardware}, {r.wall_time_s / 3600:.1f} h\n"
            f"- weights: `{r.file}`, SHA-256 {r.sha256}\n\n"
            f"Limits: {r.limits}\n\n"
            f"Use: `reslab.load_pretrained({r.name!r})`, `torch.hub.load(REPO, {r.model!r}, "
            f"pretrained={r.name!r})`, `reslab predict {r.name} IMAGES`, `reslab eval {r.name} "
            f"--data cifar10-jpeg`, `reslab train {r.model} --init-from {r.name} ...`\n")


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"unknown released weights {name!r}; valid: {', '.join(RELEASES)}, or "
                         "torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1)")
    return RELEASES[name]


def weights_file(name: str) -> Path:
    """The file of released or torchvision weights, its SHA-256 checked (released) or fetched
    through torchvision's cache (torchvision:...). What --init-from NAME starts from."""
    if str(name).startswith(TORCHVISION):
        return _torchvision_file(torchvision_weights(str(name)), str(name))
    r = _release(str(name))
    cache = Path(torch.hub.get_dir()) / "checkpoints" / f"reslab-{r.name}-{r.sha256[:8]}" \
        ".safetensors"
    path = next((p for p in (REPOSITORY / r.file, cache) if p.is_file()), None)
    if path is None:
        raise ValueError(f"{r.name}: its weights are not in this installation (a wheel carries "
                         f"none); put {r.file} from the reslab repository at {cache}, or use a "
                         "checkout")
    if (digest := file_digest(path)) != r.sha256:
        raise CheckpointError(f"{path} has SHA-256 {digest[:16]}..., not {r.name}'s "
                              f"{r.sha256[:16]}...; the file is damaged or replaced: restore it "
                              "(git checkout -- FILE)")
    return path


def load_pretrained(name: str, device: str = "cpu") -> Trained:
    """A released net (`resnet56.cifar10jpeg_16k`) or torchvision's weights by name
    (`torchvision:ResNet50_Weights.IMAGENET1K_V1`) as a Trained: model (eval mode),
    normalisation, spec, class names and input size."""
    if str(name).startswith(TORCHVISION):
        return _load_torchvision(str(name), device)
    return load_trained(weights_file(name), device=device)


def load_source(source: str | os.PathLike, device: str = "cpu") -> Trained:
    """What eval and predict read: a run folder or weights file (load_trained), else a
    released or torchvision name."""
    if is_pretrained(source) and not Path(source).exists():
        return load_pretrained(str(source), device)
    if not Path(source).exists():
        raise ValueError(f"no model.safetensors at {source}: give a finished run folder or its "
                         "weights file, a released name (reslab info --pretrained) or "
                         "torchvision:WEIGHTS")
    return load_trained(Path(source), device=device)


def hub_model(model: str, pretrained: bool | str = False, **options) -> nn.Module:
    """torch.hub's entry point for `model`: build_model(model, **options), with the released
    weights when `pretrained` (True: the longest run of `model`; or a released or torchvision
    name, `torchvision:ResNet50_Weights.IMAGENET1K_V1` for resnet50). A
    pretrained model carries `pretrained_cfg` (timm's name): its normalisation (x / 255 - mean,
    / std when std is not None), class names, input size and model card."""
    if not pretrained:
        return build_model(model, **options)
    name = default_release(model) if pretrained is True else str(pretrained)
    trained = load_pretrained(name)
    if trained.spec.model != model:
        raise ValueError(f"pretrained={name!r} is a {trained.spec.model}, not a {model}; use "
                         f"torch.hub.load(REPO, {trained.spec.model!r}, pretrained={name!r})")
    fixed = {"num_classes": trained.model.fc.out_features,
             "in_channels": trained.model.conv1.in_channels,
             "shortcut": trained.spec.shortcut or default_shortcut(model),
             "layout": trained.spec.layout or "v1",
             "layers_per_block": trained.spec.layers_per_block}
    changed = {k: v for k, v in options.items() if k not in fixed or (
        v != fixed[k] and not (k == "layers_per_block" and fixed[k] is None))}
    if changed:
        bad = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        raise ValueError(f"{name} has {', '.join(f'{k}={fixed[k]!r}' for k in changed)}; "
                         f"{bad} is another network: drop it, or fine-tune (reslab train "
                         f"{model} --init-from {name} ...)")
    # As torchvision's and timm's: in training mode, contiguous; model.eval() to predict.
    net = trained.model.to(memory_format=torch.contiguous_format).train()
    net.pretrained_cfg = {"name": name, "mean": trained.mean.cpu(),
                          "std": None if trained.std is None else trained.std.cpu(),
                          "classes": trained.classes, "input_size": trained.input_size,
                          "card": card(name) if name in RELEASES else name}
    return net


# torchvision's weights by name --------------------------------------------------------------

def torchvision_weights(name: str):  # noqa: ANN202 (a torchvision WeightsEnum member)
    from torchvision.models import get_weight

    spec = name.removeprefix(TORCHVISION)
    valid = ", ".join(f"ResNet{d}_Weights" for d in IMAGENET_STAGES)
    try:
        weights = get_weight(spec)
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ValueError(f"{name}: not torchvision weights; give ENUM.MEMBER of {valid} (e.g. "
                         "torchvision:ResNet50_Weights.IMAGENET1K_V1)") from None
    m = re.fullmatch(r"ResNet(\d+)_Weights", type(weights).__name__)
    if m is None or int(m.group(1)) not in IMAGENET_STAGES:
        raise ValueError(f"{name}: reslab builds torchvision's ResNets only ({valid}), not "
                         f"{type(weights).__name__}")
    return weights


def torchvision_cache_path(weights) -> Path:  # noqa: ANN001 (a torchvision WeightsEnum member)
    """Where torch.hub keeps the file of torchvision `weights` (what
    load_state_dict_from_url reads before downloading)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(
        urlparse(weights.url).path)


def _torchvision_file(weights, name: str) -> Path:  # noqa: ANN001
    path = torchvision_cache_path(weights)
    if not path.is_file():
        try:  # torchvision's own download into the cache, its hash checked; quiet, so that a
            # failure is one line
            with contextlib.redirect_stderr(io.StringIO()):
                weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch, Runtime
            reason = " ".join(str(getattr(e, "reason", e)).split())[:120]
            raise ValueError(f"{name}: {path.name} is not in torch's cache and could not be "
                             f"downloaded ({reason}); download {weights.url} and put it at "
                             f"{path}") from None
    return path


def _load_torchvision(name: str, device: str) -> Trained:
    from .runtime import resolve_device

    weights = torchvision_weights(name)
    _torchvision_file(weights, name)
    state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    model_name = f"resnet{type(weights).__name__[len('ResNet'):-len('_Weights')]}"
    # torchvision's ResNets: the bottleneck's stride on its 3x3 (v1.5), projections (option B).
    layout = "v1.5" if IMAGENET_STAGES[int(model_name[6:])][0] == "bottleneck" else "v1"
    categories = tuple(weights.meta["categories"])
    model = build_model(model_name, num_classes=len(categories), layout=layout, shortcut="B")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{torchvision_cache_path(weights)} does not fit {model_name} "
                              f"({str(e).splitlines()[0]}); delete it so torchvision fetches "
                              "it again") from None
    t = weights.transforms()
    crop = int(t.crop_size[0])
    # Sec. 3.4's test view (shorter side 256, centre 224) is torchvision's resize and crop.
    recipe = replace(get_recipe("imagenet"), augmentation="torchvision", precision="fp32")
    spec = RunSpec(model=model_name, data=name, recipe=recipe, shortcut="B", layout=layout)
    dev = resolve_device(device)
    model = model.to(dev).to(memory_format=torch.channels_last).eval()
    return Trained(model, torch.tensor(t.mean, device=dev), torch.tensor(t.std, device=dev),
                   spec, categories, (crop, crop))


def info_pretrained(name: str | None = None, as_json: bool = False) -> str:
    """`reslab info --pretrained [NAME]`: the released weights as a table (or JSON), or one
    model card."""
    import json
    from dataclasses import asdict

    if name is not None:
        r = _release(name)
        return json.dumps({**asdict(r), "card": card(name)}, indent=2) if as_json else card(name)
    if as_json:
        return json.dumps([asdict(r) for r in RELEASES.values()], indent=2)
    rows = [f"{'name':<26} {'data':<13} {'iterations':>10} {'test error':>10} {'fp32':>6}  "
            "hardware"]
    rows += [f"{r.name:<26} {r.data.split()[0]:<13} {r.iterations:>10,} "
             f"{100 * r.test_error:>9.2f}% {100 * r.test_error_fp32:>5.2f}%  {r.hardware}"
             for r in RELEASES.values()]
    rows.append("torch.hub: torch.hub.load(REPO, MODEL, pretrained=True) gives the longest run of "
                "MODEL; `reslab info --pretrained NAME` prints a card; torchvision's ImageNet "
                "ResNets by name: torchvision:ResNet50_Weights.IMAGENET1K_V1")
    return "\n".join(rows)
