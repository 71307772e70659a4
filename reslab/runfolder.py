"""The run folder (docs/design.md, principle 8): it describes itself and refuses to be
overwritten.

`recipe.json` holds the resolved spec, which must match on resume except for how often the run
evaluates, logs and saves (OBSERVATION_FIELDS), and except for a longer schedule that keeps
every trained iteration's learning rate (an extension); `env.json` the versions, commit,
hardware and command of the first start, with each resume appended; `metrics.jsonl` one JSON
record per log, trimmed back to the checkpoint on resume; at the end `summary.json` and
`model.safetensors`, whose metadata (spec, input channels, classes and their names,
normalisation, the tensors' digest) makes the weights usable on their own. The folder is created
under its lock and removed again if the run never started.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHTS, save_weights, write_error, write_text
from .distributed import launcher_command
from .recipes import Recipe

LOCK = ".lock"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class RunFolderError(ValueError):
    """The run folder holds a different run: refused, nothing overwritten."""


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a run: versions, commit, hardware, command line."""
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
        # The launcher's under torchrun (what resumes the run); the worker's is its tail.
        "command": launcher_command() or sys.argv,
    }


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
    # Fine-tuning (finetune.py): the weights file started from and its SHA-256, and the parts
    # (models.ResNet.part_names) kept fixed.
    init_from: str | None = None
    init_sha256: str | None = None
    freeze: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = self.recipe.as_dict()
        d["freeze"] = list(self.freeze)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["recipe"] = Recipe.from_dict(d["recipe"])
        d["freeze"] = tuple(d.get("freeze", ()))
        return cls(**d)



# Recipe fields that say how often a run evaluates, logs and saves, not what it computes: they may
# differ when a run is resumed, and the new values apply from there on (recipe.json is updated
# and env.json's resume entry names the change).
OBSERVATION_FIELDS = ("eval_every", "log_every", "checkpoint_every")
# What train() writes in a run folder; a folder holding anything else is not a run's.
_RUN_FILES = ("recipe.json", "env.json", METRICS, SUMMARY, WEIGHTS, "tb", LOCK, "checkpoint-*.pt",
              ".*.tmp*", "model.*.safetensors", "summary.*.json")


def is_run_file(path: Path) -> bool:
    """Whether `path` is (or would be) one of the files train() keeps in a run folder (the
    folder holds recipe.json or the weights): files nothing else may write."""
    folder = Path(path).parent
    return ((folder / "recipe.json").exists() or (folder / WEIGHTS).exists()) and \
        any(Path(path).match(g) for g in _RUN_FILES)


# Top-level spec fields added after run folders existed, with the defaults that mean what such a
# folder did (train.RunSpec).
ADDED_SPEC_FIELDS: dict[str, Any] = {"init_from": None, "init_sha256": None, "freeze": []}


def check_run_folder(run_dir: Path, spec_dict: dict[str, Any]) -> int | None:
    """Refuse a folder holding a different run or other files; return the iterations of the
    run being extended (the same run asked for more iterations on the same schedule), else
    None."""
    path = run_dir / "recipe.json"
    if not path.exists():
        if any(run_dir.glob("checkpoint-*.pt")) or (run_dir / WEIGHTS).exists():
            raise RunFolderError(f"{run_dir} holds a run without recipe.json; use a new --out")
        if others := sorted(p.name for p in run_dir.iterdir()
                            if not any(p.match(g) for g in _RUN_FILES)):
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise RunFolderError(f"--out {run_dir} is a folder of other files ({shown}), not a "
                                 "run folder; give a new or empty folder")
        return None
    try:
        old = json.loads(path.read_text())
        # A recipe.json written before a field existed means that field's default (every field
        # added since keeps the old behaviour as its default).
        old["recipe"] = json.loads(json.dumps(Recipe.from_dict(old["recipe"]).as_dict()))
        old = {**ADDED_SPEC_FIELDS, **old}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RunFolderError(f"{path} is unreadable ({e}); restore it, or use a new --out") from e
    if _result_part(old) == _result_part(spec_dict):
        return None
    before = {**old, "recipe": {k: v for k, v in old["recipe"].items()
                                if k not in ("iterations", "milestones")}}
    after = {**spec_dict, "recipe": {k: v for k, v in spec_dict["recipe"].items()
                                     if k not in ("iterations", "milestones")}}
    if _result_part(before) == _result_part(after):
        return _extension(run_dir, old["recipe"], spec_dict["recipe"])
    diffs = _differences(_result_part(old), _result_part(spec_dict))
    raise RunFolderError(
        f"{run_dir} holds a different run ({'; '.join(diffs)}); nothing was overwritten. "
        "Use a new --out, or the same options to resume it"
    )


def _result_part(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: a fine-tune's source by its content (SHA-256), not its path, so a
    moved or copied source is the same run."""
    recipe = {k: v for k, v in spec_dict["recipe"].items() if k not in OBSERVATION_FIELDS}
    out = {**spec_dict, "recipe": recipe}
    if out.get("init_sha256"):
        out.pop("init_from", None)
    return out


def _extension(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> int:
    """A run asked for more iterations continues only if every iteration it has trained had the
    learning rate the longer schedule gives it: the milestones below its length are kept."""
    done, more = old["iterations"], new["iterations"]
    kept = [m for m in old["milestones"] if m < done]
    milestones = " ".join(map(str, old["milestones"]))
    if more < done:
        raise RunFolderError(
            f"{run_dir} holds a run of {done} iterations; a shorter run ({more}) is another run: "
            "use a new --out"
        )
    if [m for m in new["milestones"] if m < done] != kept:
        raise RunFolderError(
            f"{run_dir} was trained for {done} iterations with the learning rate divided at "
            f"{milestones or 'no milestone'}; {more} iterations as asked would divide it at "
            f"{' '.join(map(str, new['milestones'])) or 'no milestone'}, so the iterations "
            f"already trained would not be the longer run's. To extend it, keep its milestones "
            f"(--iterations {more} --milestones {milestones or 'with none'}), or use a new --out"
        )
    return done


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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records, in order."""
    with open(Path(run_dir) / METRICS) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunFolder:
    """The files of one run: what train() writes, and where. It holds only the path."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metrics = self.path / METRICS

    def check(self, spec_dict: dict[str, Any]) -> int | None:
        """Refuse a path that cannot be this run's folder, before anything is written: a file,
        a place that cannot be created, a folder of other files or of a different run. Returns
        the iterations of a run that the spec extends (check_run_folder), else None."""
        self.check_place()
        return check_run_folder(self.path, spec_dict) if self.path.is_dir() else None

    def check_place(self) -> None:
        """The path can be a run folder: an existing folder, or one that can be created."""
        p = self.path
        if p.is_dir():
            if not (p / "recipe.json").exists():
                check_run_folder(p, {})  # refuses a folder of other files
            return
        if p.exists():
            raise RunFolderError(f"--out {p} is a file, not a folder; give a new folder or a "
                                 "run folder")
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RunFolderError(f"--out {p}: {parent} is a file, so the folder cannot be "
                                 "created; give another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"--out {p} cannot be created: {parent} is not writable; give "
                                 "an --out on a writable disk")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One process per run folder: an exclusive flock on .lock while the run writes. The
        kernel drops it when the process ends, however it ends, so a killed run's lock never
        blocks the next start; a clean exit removes the file. It creates the folder; if the run
        never started (nothing but the lock was written), the folders it created are removed
        again, so a failed start leaves nothing behind."""
        created = []
        p = self.path
        while not p.exists():
            created.append(p)
            p = p.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"--out {self.path} cannot be created: {e.strerror}; give an "
                                 "--out on a writable disk") from e
        path = self.path / LOCK
        while True:
            try:
                f = open(path, "a+")  # noqa: SIM115 (closed below, after the unlock)
            except OSError as e:
                if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                # Nothing can be written here, by us or another run: no lock is needed, and the
                # first write (if any: a finished run only reads) names the file and the fix.
                yield
                return
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise RunFolderError(
                    f"{self.path} is in use by another reslab process (pid {holder}); wait for "
                    "it to finish or stop it, or use another --out"
                ) from None
            try:  # the holder before us may have removed the file we locked: lock the new one
                if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: a newcomer locks a new file
            f.close()  # closing releases the lock
            for folder in created:  # deepest first; stops at the first that holds files
                try:
                    folder.rmdir()
                except OSError:
                    break

    def finished(self) -> dict[str, Any] | None:
        """The summary of a finished run, else None."""
        if (self.path / WEIGHTS).exists() and (self.path / SUMMARY).exists():
            return json.loads((self.path / SUMMARY).read_text())
        return None

    def start(self, spec_dict: dict[str, Any], env: dict[str, Any],
              extends: int | None = None) -> dict[str, Any]:
        """Write recipe.json and env.json (a resume appends to env.json's record, naming any
        observation field that changed). Extending a finished run first moves its weights and
        summary aside as model.<iterations>.safetensors and summary.<iterations>.json."""
        recipe = self.path / "recipe.json"
        if recipe.exists() and (changed := _differences(json.loads(recipe.read_text()),
                                                        spec_dict)):
            env = {**env, "changed": changed}
        if extends is not None:
            env = {**env, "extended_from": extends}
            for name, aside in ((WEIGHTS, f"model.{extends}.safetensors"),
                                (SUMMARY, f"summary.{extends}.json")):
                if (self.path / name).exists():
                    os.replace(self.path / name, self.path / aside)
        write_json(recipe, spec_dict)
        return record_environment(self.path / "env.json", env)

    def rewind_metrics(self, step: int | None) -> None:
        """Back to the checkpoint at `step`; None: no checkpoint, so the run starts over."""
        if step is not None:
            truncate_metrics(self.metrics, step)
        elif self.metrics.exists():
            self.metrics.unlink()  # a run killed before its first checkpoint starts over

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:  # a torn line from a full disk is dropped on resume, like one from a kill
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.metrics, e) from e

    def last_record(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text().splitlines()[-1])

    def finish(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any],
               summary: dict[str, Any]) -> None:
        """The final weights, then summary.json: a folder with both is a finished run."""
        save_weights(self.path / WEIGHTS, state_dict, metadata)
        write_json(self.path / SUMMARY, summary)


def weights_metadata(spec_dict: dict[str, Any], in_channels: int, num_classes: int,
                     mean: torch.Tensor, std: torch.Tensor | None,
                     classes: tuple[str, ...], input_size: tuple[int, int]) -> dict[str, Any]:
    """What model.safetensors carries besides the weights: enough to rebuild and feed it (the
    size of the images it was trained on: a streamed tree's crops), and the training data's
    class names (output i is classes[i])."""
    return {
        "spec": spec_dict, "in_channels": in_channels, "num_classes": num_classes,
        "classes": list(classes), "input_size": list(input_size),
        "normalization": {"mean": mean.cpu().tolist(),
                          "std": None if std is None else std.cpu().tolist()},
    }
