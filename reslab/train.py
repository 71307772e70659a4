"""train(spec, run_dir): the paper's training procedure (Sec. 4.2), one loop read top to bottom.

The run folder describes itself and resumes itself (DESIGN.md): `recipe.json` (the resolved
spec), `env.json`, `metrics.jsonl`, TensorBoard events under `tb/`, atomic checkpoints every K
iterations, and at the end `model.safetensors` and `summary.json`. Running the same spec on an
unfinished folder resumes from its last checkpoint and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import (
    WEIGHTS,
    CheckpointError,
    load_latest_checkpoint,
    save_checkpoint,
    save_weights,
    write_error,
)
from .data import BatchStream, Dataset, channel_stats, crop_flip_draw, load_dataset, to_device
from .data import pixel_mean as compute_pixel_mean
from .evaluate import evaluate
from .models import ResidualBlock, build_model, default_shortcut, model_family
from .recipes import Recipe, learning_rate
from .runfolder import (
    RunFolderError,
    check_run_folder,
    environment,
    record_environment,
    truncate_metrics,
    write_json,
)
from .step import GraphedStep, add_to_window, augmented_batch, forward_loss

# torch.compile costs 25-40 s on 2 CPU cores and saves ~9% of a bf16 step (results/bench):
# it pays back after ~3k iterations of ResNet-20, so long runs compile and short ones do not.
COMPILE_MIN_ITERATIONS = 5_000
# torch.compile's mode by device when none is given. On a GPU the whole step is captured as one
# CUDA graph (step.GraphedStep) around the default mode: "reduce-overhead" skips its graphs for
# BN's in-place statistics updates (results/h200).
COMPILE_MODES: dict[str, str | None] = {"cpu": None, "cuda": None}
# Devices where the NaN check waits for the next log line: a host sync per step idles a GPU.
DEFERRED_NAN_CHECK = ("cuda",)


class TrainingStopped(Exception):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"stopped by signal {signum} after iteration {step}; saved {checkpoint}")


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's result: the model, the data, the recipe."""

    model: str
    data: str
    recipe: Recipe = field(default_factory=Recipe)
    shortcut: str | None = None
    layout: str | None = None
    layers_per_block: int | None = None
    zero_init_residual: bool = False
    in_channels: int | None = None  # None: follow the data
    num_classes: int | None = None  # None: follow the data

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["recipe"] = Recipe.from_dict(d["recipe"])
        return cls(**d)


def model_depth(name: str) -> int:
    return int(re.search(r"\d+$", name).group())


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware runs it natively (measured ~1.9x fp32 on AVX-512 bf16)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_data_fits(spec: RunSpec, data: Dataset) -> tuple[int, int]:
    """(in_channels, num_classes), or a clear error before any work is done."""
    in_channels = data.in_channels if spec.in_channels is None else spec.in_channels
    num_classes = data.num_classes if spec.num_classes is None else spec.num_classes
    if num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1 (got {num_classes}); omit it to follow "
                         "the data")
    if in_channels != data.in_channels:
        raise ValueError(
            f"--in-channels {in_channels} but {data.name} has {data.in_channels}-channel images; "
            "omit --in-channels to follow the data"
        )
    top = int(max(data.train_labels.max(), data.test_labels.max()))
    if top >= num_classes:
        raise ValueError(
            f"{data.name} has labels up to {top} but the model has {num_classes} classes; "
            f"use --num-classes {top + 1} or omit it to follow the data"
        )
    if spec.recipe.batch_size > len(data.train_images):
        raise ValueError(
            f"batch size {spec.recipe.batch_size} is larger than the {len(data.train_images)} "
            "training images; use a smaller --batch-size"
        )
    return in_channels, num_classes


def _augment_generator(seed: int, step: int) -> torch.Generator:
    """Augmentation randomness is a pure function of (seed, step), so resume needs no RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) ^ 0x5DEECE66D)


def train(
    spec: RunSpec,
    run_dir: Path,
    *,
    data: Dataset | None = None,
    device: str = "auto",
    compile_model: bool | None = None,
    gradient_checkpointing: bool = False,
    skip_bad_images: bool = False,
    tensorboard: bool = True,
    progress: bool | None = None,
    keep_checkpoints: int = 2,
    skip_nonfinite: int = 0,
    deterministic: bool = False,
    compile_mode: str | None = None,
    cuda_graphs: bool | None = None,
) -> dict[str, Any]:
    """Train (or resume, or report a finished run) and return the run's summary.

    `skip_nonfinite` K > 0 skips a step whose loss is NaN or infinite (no update) and stops after
    K in a row; 0 stops at the first. `deterministic` uses only deterministic algorithms and
    leaves wall-clock times out of metrics.jsonl, so two runs write identical bytes.
    `compile_mode` is torch.compile's mode (None: COMPILE_MODES' choice for the device).
    `cuda_graphs` captures the whole step as one CUDA graph (None: on for CUDA devices).
    """
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {dev}; omit --cuda-graphs")
    recipe = replace(spec.recipe, precision=resolve_precision(spec.recipe.precision, dev))
    spec = replace(spec, recipe=recipe)
    family = model_family(spec.model)  # validates the name before any data is read

    run_dir.mkdir(parents=True, exist_ok=True)
    spec_dict = json.loads(json.dumps(spec.as_dict()))  # as recipe.json will hold it
    check_run_folder(run_dir, spec_dict)
    if (run_dir / WEIGHTS).exists() and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"{run_dir} is finished ({recipe.iterations} iterations, final test error "
              f"{100 * summary['final_test_error']:.2f}%); nothing to do")
        return summary

    if data is None:
        data = load_dataset(spec.data, val_split=recipe.val_split, seed=0,
                            skip_bad_images=skip_bad_images)
    in_channels, num_classes = check_data_fits(spec, data)
    write_json(run_dir / "recipe.json", spec_dict)
    env = record_environment(run_dir / "env.json", environment(dev))

    # Sec. 4.2: per-pixel mean subtraction, computed on the training split.
    if recipe.normalization == "pixel":
        mean, std = compute_pixel_mean(data.train_images), None
    else:
        mean, std = channel_stats(data.train_images)
    torch.manual_seed(recipe.seed)  # He init is drawn from the seed
    model = build_model(
        spec.model, num_classes=num_classes, in_channels=in_channels, shortcut=spec.shortcut,
        layout=spec.layout, layers_per_block=spec.layers_per_block,
        zero_init_residual=spec.zero_init_residual,
        gradient_checkpointing=gradient_checkpointing,
    ).to(dev)
    # channels_last: faster fp32 convolutions on CPU (oneDNN) and tensor cores on GPU.
    memory_format = torch.channels_last
    model = model.to(memory_format=memory_format)
    # fused=True: one kernel for the whole update. On a CPU the optimizer is ~0.5% of a step
    # either way (results/bench: fused SGD alone 0.98x); on a GPU it saves launches.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, fused=dev.type in ("cpu", "cuda"),
    )
    stream = BatchStream(len(data.train_images), recipe.batch_size, recipe.seed)
    warmup = family == "cifar" and model_depth(spec.model) >= recipe.warmup_min_depth
    recent_errors: deque[float] = deque(maxlen=recipe.warmup_window)
    step, elapsed, nonfinite_in_a_row = 0, 0.0, 0
    window: dict[str, Any] = {"loss": 0.0, "wrong": 0.0, "seen": 0}
    metrics_path = run_dir / "metrics.jsonl"

    resumed = load_latest_checkpoint(run_dir)
    if resumed is not None:
        state, path = resumed
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # e.g. the data folder gained a class since the run started
            raise RunFolderError(
                f"{path} does not fit {spec.model} with {in_channels} channels and {num_classes} "
                f"classes as {data.name} now has ({_detail(e)}); restore the data or use a new "
                "--out"
            ) from e
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["stream"])
        step, elapsed = state["step"], state["elapsed"]
        warmup = state["warmup"]
        recent_errors.extend(state["recent_errors"])
        window = dict(state["window"])
        nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        truncate_metrics(metrics_path, step)
        print(f"resuming {run_dir} from {path.name} (iteration {step}/{recipe.iterations})")
    elif metrics_path.exists():
        metrics_path.unlink()  # a run killed before its first checkpoint starts over

    train_images = data.train_images.to(dev)
    train_labels = data.train_labels.to(dev)
    mean, std = mean.to(dev), (std.to(dev) if std is not None else None)
    # The window's sums live on the device (a .item() per step would idle a GPU), updated and
    # reset in place: a captured CUDA graph adds to these very tensors.
    sums = {"loss": torch.tensor(float(window["loss"]), dtype=torch.float64, device=dev),
            "wrong": torch.tensor(float(window["wrong"]), dtype=torch.float64, device=dev),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=dev)}
    seen = int(window["seen"])
    # On a GPU the NaN check waits for the next log line or checkpoint instead of syncing every
    # step; a NaN step then updates the weights, but no checkpoint is written after it. Skipping
    # (--skip-nonfinite) and the warm-up's per-step error need the per-step check.
    deferred_check = dev.type in DEFERRED_NAN_CHECK and skip_nonfinite == 0
    last_record = step
    if compile_model is None:
        compile_model = recipe.iterations >= COMPILE_MIN_ITERATIONS
    if compile_mode is None:
        compile_mode = COMPILE_MODES.get(dev.type)
    compiler_graphs = compile_model and compile_mode in ("reduce-overhead", "max-autotune")
    forward = torch.compile(model, mode=compile_mode) if compile_model else model
    # A graphed step cannot skip itself (--skip-nonfinite), nest torch.compile's own graphs,
    # or read the RNG state as activation checkpointing does (not allowed while capturing).
    can_graph = (dev.type == "cuda" and deferred_check and not compiler_graphs
                 and not gradient_checkpointing)
    if cuda_graphs and not can_graph:
        raise ValueError("--cuda-graphs on does not go with --skip-nonfinite, "
                         "--gradient-checkpointing or a compile mode that makes its own CUDA "
                         "graphs")
    graphed = None
    if can_graph and cuda_graphs is not False:
        graphed = GraphedStep(
            forward=forward, optimizer=optimizer, images=train_images, labels=train_labels,
            mean=mean, std=std, pad=recipe.pad, precision=recipe.precision,
            memory_format=memory_format, batch_size=recipe.batch_size, sums=sums,
        )
    if dev.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick each convolution's fastest

    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)

    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        stop_signal.append(signum)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=recipe.iterations, initial=step, disable=not show, desc=spec.model,
               unit="it", dynamic_ncols=True)
    log_every = recipe.log_interval
    model.train()
    t0 = time.perf_counter() - elapsed

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "stream": stream.state_dict(), "step": step,
            "elapsed": time.perf_counter() - t0, "warmup": warmup,
            "recent_errors": list(recent_errors),
            "window": {"loss": sums["loss"].item(), "wrong": sums["wrong"].item(),
                       "seen": seen},
            "nonfinite_in_a_row": nonfinite_in_a_row, "spec": spec_dict,
        }

    try:
        while step < recipe.iterations:
            lr = learning_rate(recipe, step, warming_up=warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = stream.next()
            offsets = flips = None
            if recipe.pad > 0:  # Sec. 4.2: pad 4, random crop of the image or its flip
                offsets, flips = crop_flip_draw(len(idx), recipe.pad,
                                                _augment_generator(recipe.seed, step))
            if graphed is not None and not warmup:
                graphed(idx, offsets, flips)  # adds to the window's sums on the device
                seen += recipe.batch_size
                step += 1
            else:
                finite, wrong = True, None
                x, y = augmented_batch(
                    train_images, train_labels, to_device(idx, dev), mean=mean, std=std,
                    pad=recipe.pad, offsets=None if offsets is None else to_device(offsets, dev),
                    flips=None if flips is None else to_device(flips, dev),
                    memory_format=memory_format,
                )
                # A skipped step leaves the model as it was, BN statistics included.
                buffers = [b.clone() for b in model.buffers()] if skip_nonfinite else []
                if compiler_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                # wrong is counted before backward: a CUDA graph's outputs are only safe to
                # read until it runs again.
                _, loss, wrong = forward_loss(forward, x, y, dev, recipe.precision)
                if not (deferred_check and not warmup):
                    finite = bool(torch.isfinite(loss))
                nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
                if nonfinite_in_a_row > skip_nonfinite:
                    in_a_row = f" ({nonfinite_in_a_row} in a row)" if skip_nonfinite else ""
                    raise NonFiniteLoss(
                        f"loss is {loss.item()} at iteration {step + 1}{in_a_row}; the last "
                        f"good checkpoint in {run_dir} is untouched (try a lower --lr)"
                    )
                if finite:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                else:  # --skip-nonfinite: no update; the iteration still counts
                    with torch.no_grad():
                        for b, saved in zip(model.buffers(), buffers, strict=True):
                            b.copy_(saved)
                    bar.write(f"skipped iteration {step + 1}: loss is {loss.item()} "
                              f"({nonfinite_in_a_row} in a row, --skip-nonfinite "
                              f"{skip_nonfinite})")
                step += 1

                # Training error on the augmented batch: the paper's dashed curves (Fig. 6).
                if finite:
                    add_to_window(sums, loss, wrong, len(y))
                    seen += len(y)
                    if warmup:
                        recent_errors.append(wrong.item() / len(y))
                        full = len(recent_errors) == recent_errors.maxlen
                        if (full and sum(recent_errors) / len(recent_errors)
                                < recipe.warmup_until_error):
                            warmup = False  # the paper's ResNet-110: back to 0.1 (Sec. 4.2)
                            bar.write(f"warm-up over at iteration {step}: training error below "
                                      f"{recipe.warmup_until_error:.0%}, lr back to {recipe.lr}")
            bar.update(1)

            evaluating = step % recipe.eval_every == 0 or step == recipe.iterations
            saving = (step % recipe.checkpoint_every == 0 or step == recipe.iterations
                      or bool(stop_signal))
            logging = step % log_every == 0 or evaluating
            if deferred_check and (logging or saving) and int(sums["nonfinite"]):
                raise NonFiniteLoss(
                    f"loss became NaN or infinite between iterations {last_record + 1} and "
                    f"{step}; the last good checkpoint in {run_dir} is untouched (try a lower "
                    "--lr)"
                )
            if logging:
                last_record = step
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": step * recipe.batch_size / len(train_images),
                    "lr": lr,
                    "train_loss": sums["loss"].item() / max(seen, 1),
                    "train_error": sums["wrong"].item() / max(seen, 1),
                }
                sums["loss"].zero_()
                sums["wrong"].zero_()
                seen = 0
                if evaluating:
                    record["test_error"], record["test_loss"] = evaluate(
                        model, data.test_images, data.test_labels, mean, std,
                        precision=recipe.precision, memory_format=memory_format,
                    )
                    if data.val_images is not None:
                        record["val_error"], record["val_loss"] = evaluate(
                            model, data.val_images, data.val_labels, mean, std,
                            precision=recipe.precision, memory_format=memory_format,
                        )
                if not deterministic:  # wall-clock time would differ between two runs
                    record["time"] = time.perf_counter() - t0
                try:  # a torn line from a full disk is dropped on resume, like one from a kill
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError as e:
                    raise write_error(metrics_path, e) from e
                if writer is not None:
                    for k, v in record.items():
                        if k not in ("step", "epoch", "time"):
                            writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                err=f"{100 * record['train_error']:.1f}%")
                if evaluating:
                    val = (f", val error {100 * record['val_error']:.2f}%"
                           if "val_error" in record else "")
                    bar.write(
                        f"iteration {step}/{recipe.iterations}  lr {lr:g}  train error "
                        f"{100 * record['train_error']:.2f}%  test error "
                        f"{100 * record['test_error']:.2f}%{val}"
                    )
            if saving:
                path = save_checkpoint(run_dir, step, checkpoint_state(), keep=keep_checkpoints)
                if stop_signal and step < recipe.iterations:
                    raise TrainingStopped(step, path, stop_signal[0])
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        torch.use_deterministic_algorithms(was_deterministic)

    wall = time.perf_counter() - t0
    shortcut = spec.shortcut or default_shortcut(spec.model)
    final = json.loads(metrics_path.read_text().splitlines()[-1])
    summary = {
        "model": spec.model,
        "data": spec.data,
        "depth": model_depth(spec.model),
        "plain": shortcut == "none",
        "shortcut": shortcut,
        # From the built blocks, so a bottleneck net says 3 (its spec leaves the field unset).
        "layers_per_block": max(b.num_layers for b in model.modules()
                                if isinstance(b, ResidualBlock)),
        "iterations": recipe.iterations,
        "seed": recipe.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "precision": recipe.precision,
        "final_train_error": final["train_error"],
        "final_test_error": final["test_error"],
        "final_test_loss": final["test_loss"],
        "wall_time_s": wall,
        "images_per_second": recipe.iterations * recipe.batch_size / wall,
        "run_dir": str(run_dir),
        **{k: v for k, v in env.items() if k in ("commit", "cpu", "gpu", "torch")},
    }
    if env.get("resumes"):
        summary["resumed_at_commits"] = sorted({r["commit"] or "unknown" for r in env["resumes"]})
    if "val_error" in final:
        summary["final_val_error"] = final["val_error"]
    save_weights(run_dir / WEIGHTS, model.state_dict(), {
        "spec": spec_dict, "in_channels": in_channels, "num_classes": num_classes,
        "normalization": {"mean": mean.cpu().tolist(),
                          "std": None if std is None else std.cpu().tolist()},
    })
    write_json(run_dir / "summary.json", summary)
    return summary


def _detail(error: Exception) -> str:
    """One line of an error; for load_state_dict's, the first size mismatch."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return next((line for line in lines if "mismatch" in line), lines[0])


def load_trained(path: Path, device: str = "cpu"):
    """(model, mean, std, spec) from a run folder or a model.safetensors written by train()."""
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
        model = build_model(
            spec.model, num_classes=meta["num_classes"], in_channels=meta["in_channels"],
            shortcut=spec.shortcut, layout=spec.layout, layers_per_block=spec.layers_per_block,
        )
        model.load_state_dict(state, strict=True)
        norm = meta["normalization"]
        mean = torch.tensor(norm["mean"], dtype=torch.float32)
        std = None if norm["std"] is None else torch.tensor(norm["std"], dtype=torch.float32)
        if mean.ndim not in (1, 3) or len(mean) != meta["in_channels"]:
            raise ValueError(f"normalisation mean of shape {tuple(mean.shape)} for "
                             f"{meta['in_channels']}-channel images")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{weights} has malformed reslab metadata or weights ({type(e).__name__}: "
            f"{_detail(e)}); give a model.safetensors written by `reslab train`"
        ) from e
    dev = resolve_device(device)
    model = model.to(dev).to(memory_format=torch.channels_last).eval()
    mean, std = mean.to(dev), (None if std is None else std.to(dev))
    return model, mean, std, spec

