"""The training loop (Sec. 3.4 and 4.2's SGD): the learning rate of each iteration, one step,
and on their grids a metrics record, an evaluation and a checkpoint; a signal to any rank stops
every rank after the same step with a checkpoint. train.train sets up a Session and calls run.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from .checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from .data import BatchStream, DataError
from .data.feed import BadImage
from .distributed import World, all_sum
from .recipes import Plateau, Recipe, learning_rate
from .runfolder import RunFolder, RunSpec
from .runtime import MissingExtra, algorithms, require, stop_signals
from .step import NonFiniteLoss, Window

if TYPE_CHECKING:
    from .train import TrainOptions


class TrainingStopped(Exception):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"stopped by signal {signum} after iteration {step}; saved {checkpoint}")


@dataclass
class Session:
    """What the loop runs: the run as trained (`spec`) and as asked (`spec_dict`, recipe.json),
    its folder, ranks and device, and the state a checkpoint holds, at iteration `step`."""

    spec: RunSpec
    spec_dict: dict[str, Any]
    folder: RunFolder
    world: World
    device: torch.device
    options: TrainOptions
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    plateau: Plateau
    feed: Any  # data.feed.MemoryFeed or TreeFeed
    window: Window
    run_step: Any  # step.build_step's
    mean: torch.Tensor
    std: torch.Tensor | None
    source_norm: tuple[torch.Tensor, torch.Tensor | None] | None
    step: int
    elapsed: float


def run(s: Session) -> float:
    """Train from s.step to the recipe's last iteration; returns the wall clock's start (the
    run's time so far subtracted)."""
    recipe, o, world, dev, main = s.spec.recipe, s.options, s.world, s.device, s.world.main
    last_record = s.step
    bar = tqdm(total=recipe.iterations, initial=s.step, desc=s.spec.model, unit="it",
               disable=not (main and _show_progress(o)), dynamic_ncols=True)
    # Off a terminal (a log file, nohup, CI) with no choice made, a line per log interval.
    pace = _Pace(s.step, recipe) if main and o.progress is None and bar.disable else None
    with algorithms(dev, o.deterministic), stop_signals() as stop, \
            _writer(s.folder, o, s.step, main) as tb, bar:
        s.model.train()
        t0 = time.perf_counter() - s.elapsed
        while s.step < recipe.iterations:
            lr = learning_rate(recipe, s.step, warming_up=s.window.warmup,
                               divisions=s.plateau.divisions)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            try:
                note = s.run_step(s.feed.next(s.stream, s.step), s.step)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e}; {_kept(s.folder)}") from None
            except BadImage as e:  # the stream is at its batch: resuming meets it again
                raise DataError(f"{e} (met at iteration {s.step + 1}; saved "
                                f"{_checkpoint(s, t0).name}, so the same command resumes "
                                "there once the file is fixed or removed)") from None
            s.step += 1
            if note and main:
                bar.write(note)
            bar.update(1)

            evaluating = s.step % recipe.eval_every == 0 or s.step == recipe.iterations
            # A signal to any rank stops every rank after this same step.
            stopping = all_sum(world, [float(bool(stop))], dev)[0] > 0
            saving = (s.step % recipe.checkpoint_every == 0 or s.step == recipe.iterations
                      or stopping)
            logging = s.step % recipe.log_interval == 0 or evaluating
            if s.run_step.deferred and (logging or saving) and all_sum(
                    world, [float(s.window.nonfinite_since_check())], dev)[0]:
                raise NonFiniteLoss(f"loss became NaN or infinite between iterations "
                                    f"{last_record + 1} and {s.step}; {_kept(s.folder)}")
            if logging:
                _record(s, lr, evaluating, t0, tb, bar, pace)
                last_record = s.step
            if saving:
                path = _checkpoint(s, t0)
                if stopping and s.step < recipe.iterations:
                    raise TrainingStopped(s.step, path, stop[0] if stop else signal.SIGTERM)
    return t0


def _record(s: Session, lr: float, evaluating: bool, t0: float, tb, bar: tqdm,  # noqa: ANN001
            pace: _Pace | None) -> None:
    """A metrics record at s.step: the training window's, and at an evaluation the test (and
    val) error, which may divide the learning rate (a plateau, Sec. 3.4)."""
    recipe, main = s.spec.recipe, s.world.main
    record = _training_record(s.step, lr, s.window, s.feed, recipe, s.world)
    if evaluating:
        record.update(s.feed.evaluate(s.model, s.mean, s.std))
        error = record.get("val_error", record["test_error"])
        if recipe.lr_policy == "plateau" and s.plateau.update(error) and main:
            new = learning_rate(recipe, s.step, divisions=s.plateau.divisions)
            bar.write(f"error plateaued at iteration {s.step} (best "
                      f"{100 * s.plateau.best:.2f}%): lr divided by 10, to {new:g}")
    if not s.options.deterministic:  # wall-clock time would differ between two runs
        record["time"] = time.perf_counter() - t0
    if main:
        s.folder.append_metrics(record)
        _log(tb, bar, record, recipe.iterations, evaluating)
        if pace is not None and not evaluating:
            print(pace.line(record), flush=True)


def _checkpoint(s: Session, t0: float) -> Path:
    """Every rank calls it (the window's sums are all-reduced); rank 0 writes."""
    window_state = s.window.state_dict(s.world)
    if not s.world.main:
        return checkpoint_path(s.folder.path, s.step)
    return save_checkpoint(s.folder.path, s.step, {
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "stream": s.stream.state_dict(), "step": s.step,
        "elapsed": time.perf_counter() - t0, **window_state,
        "plateau": s.plateau.state_dict(), "skipped_images": s.feed.skipped,
        "spec": s.spec_dict, **({} if s.source_norm is None else {"normalization": {
            "mean": s.source_norm[0], "std": s.source_norm[1]}}),
    }, keep=s.options.keep_checkpoints)


def _training_record(step: int, lr: float, window: Window, feed: Any, recipe: Recipe,
                     world: World) -> dict[str, Any]:
    """A metrics record's training part: the window closed at `step`, summed over the ranks."""
    train_loss, train_error = window.take(world)
    record: dict[str, Any] = {
        "step": step, "epoch": step * recipe.batch_size / feed.n_train,
        "lr": lr, "train_loss": train_loss, "train_error": train_error,
    }
    # The record's lr is its last iteration's: a warm-up shorter than one record would
    # otherwise leave no trace in the metrics.
    if window.warmup_over_at is not None:
        record["warmup_over_at"], window.warmup_over_at = window.warmup_over_at, None
    if feed.skipped:
        record["skipped_images"] = feed.skipped
    return record


def _kept(folder: RunFolder) -> str:
    """What a run stopped by a non-finite loss leaves to resume from, by name."""
    kept = list_checkpoints(folder.path)
    if not kept:
        return ("no checkpoint was saved yet, so rerunning starts over (try a lower --lr, or "
                "--skip-nonfinite K)")
    return (f"the last good checkpoint, {kept[-1]}, is untouched (try a lower --lr, or "
            "--skip-nonfinite K, and rerun to resume from it)")


def _show_progress(options: TrainOptions) -> bool:
    return sys.stderr.isatty() if options.progress is None else options.progress


class _Pace:
    """The line a run prints per log interval when no progress bar is shown: iteration, lr,
    loss, error, images/s and the time left, at the pace since the last line."""

    def __init__(self, step: int, recipe: Recipe) -> None:
        self.step, self.t, self.recipe = step, time.perf_counter(), recipe

    def line(self, record: dict[str, Any]) -> str:
        now, step, r = time.perf_counter(), record["step"], self.recipe
        per_step = (now - self.t) / max(step - self.step, 1)
        self.step, self.t = step, now
        left = int(per_step * (r.iterations - step))
        return (f"iteration {step}/{r.iterations}  lr {record['lr']:g}  loss "
                f"{record['train_loss']:.3f}  train error {100 * record['train_error']:.2f}%  "
                f"{r.batch_size / max(per_step, 1e-9):,.0f} images/s  "
                f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")


def _writer(folder: RunFolder, options: TrainOptions, step: int, main: bool = True):
    """TensorBoard events under tb/ (rank 0's), purged past `step` on resume; or nothing."""
    if not options.tensorboard or not main:
        return nullcontext()
    try:
        require("tensorboard", "TensorBoard events")
    except MissingExtra as e:  # optional: the run goes on without its tb/ folder
        print(f"note: no tb/ events: {e}")
        return nullcontext()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder.path / "tb"), purge_step=step or None)


def _log(tb, bar: tqdm, record: dict[str, Any], iterations: int, evaluating: bool) -> None:
    """A metrics record to TensorBoard, the progress bar and, at an evaluation, one line."""
    if tb is not None:
        for k, v in record.items():
            if k not in ("step", "epoch", "time") and v is not None:  # None: not defined
                tb.add_scalar(k, v, record["step"])
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", err=f"{100 * record['train_error']:.1f}%")
    if evaluating:
        val = f", val error {100 * record['val_error']:.2f}%" if "val_error" in record else ""
        bar.write(f"iteration {record['step']}/{iterations}  lr {record['lr']:g}  train error "
                  f"{100 * record['train_error']:.2f}%  test error "
                  f"{100 * record['test_error']:.2f}%{val}")
