"""train(spec, run_dir, options): the paper's training procedure (Sec. 4.2), one loop read top
to bottom.

What a run computes is its RunSpec (model, data, recipe); how it executes is its TrainOptions
(device, compilation, graphs, progress display), which change no result. The run folder
(runfolder.py) describes itself and resumes itself: running the same spec on an unfinished folder
resumes from its last checkpoint and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import re
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import loop
from .checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
)
from .data import BatchStream, Dataset, ImageTree, open_data
from .data.workers import check_workers
from .distributed import (
    RENDEZVOUS_TIMEOUT,
    World,
    broadcast,
    process_group,
    rank_device,
    resume_notes,
    sync_batch_norm,
    world_from_env,
)
from .finetune import fit_to_data, source_layout
from .loop import TrainingStopped
from .models import (
    build_model,
    default_shortcut,
    layers_per_block,
    model_family,
)
from .recipes import Plateau, Recipe
from .runfolder import RunFolder, RunFolderError, RunSpec, environment, weights_metadata
from .runtime import (
    resolve_device,
    resolve_precision,
)
from .step import MEMORY_FORMAT, NonFiniteLoss, Window, build_step, make_optimizer
from .trained import Trained, error_detail, load_trained

__all__ = ["COMPILE_MIN_ITERATIONS", "COMPILE_MODES", "NonFiniteLoss", "RunFolderError",
           "RunSpec", "TrainOptions", "Trained", "TrainingStopped", "check_start", "load_trained",
           "resolve_device", "resolve_precision", "train"]

# torch.compile costs 25-40 s on 2 CPU cores and saves ~9% of a bf16 step (results/bench):
# it pays back after ~3k iterations of ResNet-20, so long runs compile and short ones do not.
COMPILE_MIN_ITERATIONS = 5_000
# torch.compile's mode by device when none is given. On a GPU the whole step is captured as one
# CUDA graph (step.GraphedStep) around the default mode: "reduce-overhead" skips its graphs for
# BN's in-place statistics updates (results/h200).
COMPILE_MODES: dict[str, str | None] = {"cpu": None, "cuda": None}


@dataclass(frozen=True)
class TrainOptions:
    """How a run executes; none of these changes its result (deterministic aside, which picks
    only deterministic algorithms and leaves wall-clock times out of metrics.jsonl, so two runs
    write identical bytes).

    compile_model: torch.compile the model (None: for runs of >= COMPILE_MIN_ITERATIONS);
    compile_mode: torch.compile's mode (None: COMPILE_MODES' choice for the device);
    cuda_graphs: the whole step as one CUDA graph (None: on for CUDA devices);
    skip_nonfinite: K > 0 skips a step whose loss is NaN or infinite (no update) and stops
    after K in a row; 0 stops at the first. progress: a tqdm bar (None: when stderr is a tty).
    """

    device: str = "auto"
    compile_model: bool | None = None
    compile_mode: str | None = None
    cuda_graphs: bool | None = None
    gradient_checkpointing: bool = False
    skip_bad_images: bool = False
    skip_nonfinite: int = 0
    deterministic: bool = False
    tensorboard: bool = True
    progress: bool | None = None
    keep_checkpoints: int = 2
    workers: int | None = None  # loader processes for streamed image trees (None: feed's default)
    sync_bn: bool = False  # under torchrun: BN statistics over the global batch, not per rank
    rendezvous_timeout: float = RENDEZVOUS_TIMEOUT  # under torchrun: seconds to meet the others
    loader: str = "auto"  # an image folder in memory or streamed (data.open_data)


def model_depth(name: str) -> int:
    return int(re.search(r"\d+$", name).group())


def warms_up(model: str, warmup_min_depth: int) -> bool:
    """Whether `model` starts with Sec. 4.2's warm-up (lr 0.01 until training error < 80%):
    CIFAR-style nets of `warmup_min_depth` layers or more (the paper's ResNet-110)."""
    return model_family(model) == "cifar" and model_depth(model) >= warmup_min_depth


def train(
    spec: RunSpec, run_dir: Path, *, data: Dataset | ImageTree | None = None,
    options: TrainOptions = TrainOptions(),  # noqa: B008 (frozen: one shared default is safe)
) -> dict[str, Any]:
    """Train (or resume, or extend, or report a finished run) and return the run's summary.

    Nothing is written to the run folder until the run is known to be able to start (device,
    model, folder, data and any checkpoint all checked), so a failed start leaves the folder as
    it was and the corrected call just works."""
    o, folder, world = options, RunFolder(run_dir), world_from_env()
    spec, layout_note = source_layout(spec)  # check_start's own call is then a no-op
    dev, spec, extends = check_start(spec, folder.path, o)
    dev, recipe = rank_device(world, dev), spec.recipe
    spec_dict = json.loads(json.dumps(spec.as_dict()))  # as recipe.json will hold it
    main = world.main  # rank 0 alone writes the run folder (one process: always)
    with process_group(world, dev, o.rendezvous_timeout), \
            (folder.lock() if main else nullcontext()):
        # Nothing is written before the lock is held.
        done = folder.finished() if extends is None and main else None
        if (done := broadcast(world, done, dev)) is not None:
            if main:
                print(f"{folder.path} is finished ({recipe.iterations} iterations, final test "
                      f"error {100 * done['final_test_error']:.2f}%); nothing to do")
            return done
        if data is None:
            data = open_data(spec.data, val_split=recipe.val_split, seed=0,
                             skip_bad_images=o.skip_bad_images, loader=o.loader)
        in_channels, num_classes = data.fits(spec.in_channels, spec.num_classes,
                                             spec.recipe.batch_size)
        size = data.view_size  # the views' (weights metadata, a source's normalisation)
        # Rank 0 reads the checkpoint and sends it: every rank resumes from the same state.
        resumed = broadcast(world, load_latest_checkpoint(folder.path) if main else None, dev)
        # A fine-tune takes its source's normalisation and, on photographs, torchvision's
        # augmentation; `spec` is now the run as trained (its weights' metadata), spec_dict the
        # run as asked (recipe.json, what a resume is compared with).
        spec, source_norm, init_notes = fit_to_data(
            spec, augmentations=data.augmentations, channels=in_channels, size=size,
            recorded=resumed[0].get("normalization") if resumed else None,
            resuming=resumed is not None)
        recipe = spec.recipe
        world.shard(recipe.batch_size)  # the global batch divides among the ranks
        feed = data.feed(recipe, dev, workers=o.workers, skip_bad_images=o.skip_bad_images,
                         world=world)
        # Sec. 4.2 and 3.4: per-pixel mean subtraction, computed on the training split.
        mean, std = feed.stats() if source_norm is None else source_norm
        model, notes = _new_model(spec, in_channels, num_classes, size, o, dev,
                                  resumable=bool(list_checkpoints(folder.path)))
        init_notes = notes + init_notes
        optimizer = make_optimizer(model, recipe, dev)
        stream = BatchStream(feed.n_train, recipe.batch_size, recipe.seed)
        plateau = Plateau(recipe.plateau_patience)
        step, elapsed, state = 0, 0.0, None
        if resumed is not None:
            state, path = resumed
            _restore(model, optimizer, stream, state, path, spec, data, in_channels, num_classes)
            step, elapsed = state["step"], state["elapsed"]
            if "plateau" in state:
                plateau.load_state_dict(state["plateau"])
            feed.skipped = state.get("skipped_images", 0)
        elif extends is not None and folder.finished() is not None:
            raise RunFolderError(f"{folder.path} has no checkpoint of its last iteration "
                                 f"({extends}) to extend it from; use a new --out")
        env = _start_folder(folder, spec_dict, recipe, dev, world, o, extends, layout_note,
                            init_notes, None if state is None else (path, step)) if main else {}
        mean, std = mean.to(dev), (std.to(dev) if std is not None else None)
        window, run_step = _build_step(spec, model, optimizer, feed, mean, std, o, dev, world,
                                       state)
        t0 = loop.run(loop.Session(
            spec=spec, spec_dict=spec_dict, folder=folder, world=world, device=dev, options=o,
            model=model, optimizer=optimizer, stream=stream, plateau=plateau, feed=feed,
            window=window, run_step=run_step, mean=mean, std=std, source_norm=source_norm,
            step=step, elapsed=elapsed))

        summary = None
        if main:
            summary = _summary(spec, model, folder, env, wall=time.perf_counter() - t0)
            folder.finish(model.state_dict(), weights_metadata(
                json.loads(json.dumps(spec.as_dict())), in_channels, num_classes, mean, std,
                feed.classes, size), summary)
        return broadcast(world, summary, dev)


def _start_folder(folder: RunFolder, spec_dict: dict[str, Any], recipe: Recipe,
                  dev: torch.device, world: World, o: TrainOptions, extends: int | None,
                  layout_note: str | None, init_notes: list[str],
                  resumed: tuple[Path, int] | None) -> dict[str, Any]:
    """Rank 0: the run folder started (recipe.json, env.json) and what the run says as it
    starts (the source's layout, the ranks, its fine-tune or resume notes); env.json's."""
    if layout_note:
        print(layout_note, file=sys.stderr)
    env = folder.start(spec_dict, {**environment(dev), "world_size": world.size,
                                   "sync_bn": o.sync_bn}, extends=extends)
    if world.size > 1:
        print(f"{world.size} ranks, {recipe.batch_size // world.size} images each of the "
              f"global batch of {recipe.batch_size}"
              + (", BN synchronised" if o.sync_bn else ", BN statistics per rank"))
    if resumed is None:
        for note in init_notes:
            print(note)
    else:
        path, step = resumed
        more = f", extended from {extends}" if extends is not None else ""
        print(f"resuming {folder.path} from {path.name} (iteration {step}/"
              f"{recipe.iterations}{more})")
        for note in resume_notes([env, *env.get("resumes", [])], world.size, o.sync_bn):
            print(note)
    folder.rewind_metrics(resumed[1] if resumed is not None else None)
    return env


def _build_step(spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer, feed: Any,
                mean: torch.Tensor, std: torch.Tensor | None, o: TrainOptions,
                dev: torch.device, world: World, state: dict[str, Any] | None
                ) -> tuple[Window, Any]:
    """The logging window (restored from `state`) and the step: compiled for long runs, one
    CUDA graph on a GPU, DistributedDataParallel's gradient average over the ranks."""
    recipe = spec.recipe
    warmup = warms_up(spec.model, recipe.warmup_min_depth)
    window = Window.start(dev, warmup=warmup, warmup_window=recipe.warmup_window, state=state,
                          world=world)
    compile_model = (recipe.iterations >= COMPILE_MIN_ITERATIONS if o.compile_model is None
                     else o.compile_model)
    ddp = None
    if world.size > 1:  # averages the ranks' gradients: the global batch's mean loss
        ddp = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    return window, build_step(
        model, optimizer, feed.images, feed.labels, mean, std, recipe, window,
        compile_model=compile_model,
        compile_mode=COMPILE_MODES.get(dev.type) if o.compile_mode is None else o.compile_mode,
        cuda_graphs=o.cuda_graphs, skip_nonfinite=o.skip_nonfinite,
        gradient_checkpointing=o.gradient_checkpointing, world=world, forward_module=ddp,
    )


def _new_model(spec: RunSpec, in_channels: int, num_classes: int, size: tuple[int, int],
               o: TrainOptions, dev: torch.device, *, resumable: bool
               ) -> tuple[nn.Module, list[str]]:
    """The run's network, He-initialised from its seed (or from its fine-tune source), BN
    synchronised and parts frozen as asked, on its device; and what initialising it noted."""
    torch.manual_seed(spec.recipe.seed)  # He init is drawn from the seed
    model = build_model(
        spec.model, num_classes=num_classes, in_channels=in_channels, shortcut=spec.shortcut,
        layout=spec.layout, layers_per_block=spec.layers_per_block,
        zero_init_residual=spec.zero_init_residual,
        gradient_checkpointing=o.gradient_checkpointing, input_size=size,
    )
    notes = _initialise(model, spec, resumable=resumable)
    if o.sync_bn:
        model = sync_batch_norm(model, dev)
    if spec.freeze:  # after sync_batch_norm, which makes new BN modules on a CPU
        model.freeze(spec.freeze)
    return model.to(dev).to(memory_format=MEMORY_FORMAT), notes


def check_start(spec: RunSpec, run_dir: Path, options: TrainOptions, *, compare: bool = True
                ) -> tuple[torch.device, RunSpec, int | None]:
    """What can be checked before the data is read, in the order a user fixes it: the device,
    the model and its options, the run folder (compare: against this spec; else only that it can
    be a run folder). Returns the device, the spec with its precision resolved, and the
    iterations of a run it extends (RunFolder.check)."""
    if options.workers is not None:
        check_workers(options.workers)
    dev = resolve_device(options.device)
    if options.cuda_graphs and dev.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {dev}; omit --cuda-graphs")
    spec = replace(spec, recipe=replace(spec.recipe, precision=resolve_precision(
        spec.recipe.precision, dev)))
    model_family(spec.model)
    spec = source_layout(spec)[0]
    folder = RunFolder(run_dir)
    check_model_options(spec, resumable=bool(list_checkpoints(folder.path)))
    if not compare:
        folder.check_place()
        return dev, spec, None
    return dev, spec, folder.check(json.loads(json.dumps(spec.as_dict())))


def check_model_options(spec: RunSpec, resumable: bool = False) -> None:
    """The model's options are valid (ValueError otherwise): built on the meta device, which
    costs no memory and no time, so a bad combination is refused before the data is read.
    `resumable`: a checkpoint holds every weight, so a fine-tune's source may be gone."""
    with torch.device("meta"):
        model = build_model(spec.model, num_classes=spec.num_classes or 10,
                            in_channels=spec.in_channels or 3, shortcut=spec.shortcut,
                            layout=spec.layout, layers_per_block=spec.layers_per_block,
                            zero_init_residual=spec.zero_init_residual)
        if spec.freeze:
            model.freeze(spec.freeze)
            if set(model.part_names()) <= set(spec.freeze):
                raise ValueError("--freeze covers every part of the network: nothing would "
                                 "train; leave fc (or more) out of it")
    if spec.init_from is not None and not (resumable and _source_gone(spec)):
        from .finetune import check_init, load_source

        load_source(check_init(spec.init_from, spec.init_sha256))  # before the data is read


def _source_gone(spec: RunSpec) -> bool:
    """Whether a fine-tune's source file no longer exists (moved or deleted)."""
    from .finetune import resolve_source

    try:
        resolve_source(spec.init_from)
    except ValueError:
        return True
    return False


def _initialise(model: torch.nn.Module, spec: RunSpec, resumable: bool = False) -> list[str]:
    """--init-from: the source's weights in `model` (a resumed run's checkpoint then replaces
    them); notes for the user."""
    if spec.init_from is None or (resumable and _source_gone(spec)):
        return []  # the checkpoint about to be restored holds every weight
    from .finetune import check_init, initialise, load_source

    source = check_init(spec.init_from, spec.init_sha256)
    notes = initialise(model, load_source(source), source)
    frozen = f" ({', '.join(spec.freeze)} frozen)" if spec.freeze else ""
    return [f"initialised from {source}{frozen}", *notes]


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: BatchStream,
             state: dict[str, Any], path: Path, spec: RunSpec, data: Dataset, in_channels: int,
             num_classes: int) -> None:
    """Load a checkpoint's model, optimizer and batch order (the window is Window.start's)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # e.g. the data folder gained a class since the run started
        raise RunFolderError(
            f"{path} does not fit {spec.model} with {in_channels} channels and {num_classes} "
            f"classes as {data.name} now has ({error_detail(e)}); restore the data or use a new "
            "--out"
        ) from e
    optimizer.load_state_dict(state["optimizer"])
    stream.load_state_dict(state["stream"])


def _summary(spec: RunSpec, model: torch.nn.Module, folder: RunFolder, env: dict[str, Any],
             wall: float) -> dict[str, Any]:
    recipe = spec.recipe
    shortcut = spec.shortcut or default_shortcut(spec.model)
    final = folder.last_record()
    summary = {
        "model": spec.model,
        "data": spec.data,
        "depth": model_depth(spec.model),
        "plain": shortcut == "none",
        "shortcut": shortcut,
        # From the built blocks, so a bottleneck net says 3 (its spec leaves the field unset).
        "layers_per_block": layers_per_block(model),
        "iterations": recipe.iterations,
        "seed": recipe.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "precision": recipe.precision,
        "final_train_error": final["train_error"],
        "final_test_error": final["test_error"],
        "final_test_loss": final["test_loss"],
        "wall_time_s": wall,
        "images_per_second": recipe.iterations * recipe.batch_size / wall,
        "run_dir": str(folder.path),
        **{k: v for k, v in env.items() if k in ("commit", "cpu", "gpu", "torch")},
    }
    if env.get("resumes"):
        summary["resumed_at_commits"] = sorted({r["commit"] or "unknown" for r in env["resumes"]})
    if "val_error" in final:
        summary["final_val_error"] = final["val_error"]
    return summary


class _PublicTrain(types.ModuleType):
    """`reslab.train(model, *, data, out, **options)`, the public API's training call (cli.
    train_run), is this module called: importing reslab.train (as the package itself does) makes
    the package's `train` attribute this module, so the module is what answers the call."""

    def __call__(self, model: str, *, data: str | Path, out: str | Path,
                 **options: Any) -> Path:
        from .cli import train_run

        return train_run(model, data=data, out=out, **options)


sys.modules[__name__].__class__ = _PublicTrain
