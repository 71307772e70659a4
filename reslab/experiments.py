"""What `reslab reproduce` and `reslab study` share: an experiment's common arguments, the run
pool, and the reports.

An experiment trains arms (configurations, once per seed) into a pool of run folders
(`OUT/runs/` unless given) named by their configuration, so a finished run is reused, an
unfinished one resumed, and two experiments that need the same run train it once. Its report is
`OUT/report.md` with `OUT/summary.json`, naming the command, commits, hardware and wall time.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .data import Dataset
from .evaluate import layer_responses
from .recipes import RECIPES, Recipe, get_recipe
from .runfolder import environment, read_metrics
from .runtime import require, resolve_device
from .train import RunSpec, TrainOptions, train
from .trained import load_trained

# CIFAR-10 test error (%) of Table 6 (docs/paper.md); the plain nets' are only drawn (Fig. 6).
PAPER_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_TABLE6_110 = "6.43 (6.61 ± 0.16)"


# A tiny schedule still evaluates the test set and writes a checkpoint at most every this many
# iterations (and at its end): 20 evaluations of 10,000 images in a 30-iteration run cost more
# than its training.
MIN_EVAL_EVERY = 100


def study_recipe(iterations: int, seed: int, base: Recipe | None = None) -> Recipe:
    """The paper's recipe scaled to `iterations`, evaluated 20 times (at most every
    MIN_EVAL_EVERY iterations) and logged every 1%."""
    base = (base or get_recipe("cifar10")).with_iterations(iterations)
    every = max(min(iterations, MIN_EVAL_EVERY), iterations // 20)
    return replace(base, seed=seed, eval_every=every, checkpoint_every=every, log_every=0)


@dataclass(frozen=True)
class Experiment:
    """The arguments every experiment takes: its data and report folder, each arm's length and
    seeds, the run pool, whether to train or only report, and how runs execute.

    precision: the arms' recipe precision (None: the recipe's own, "auto"); a run of another
    precision is another run, named so in the pool.
    """

    data: str
    out_dir: Path
    iterations: int = 64_000
    seeds: int = 1
    runs_dir: Path | None = None
    report_only: bool = False
    options: TrainOptions = TrainOptions()  # frozen: one shared default is safe
    precision: str | None = None
    batch_size: int | None = None  # None: the recipe's (a run of another size is named so)

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.iterations < 1:
            raise ValueError("--seeds and --iterations must be >= 1")
        require("matplotlib", "the report's plots")  # before hours of training, not after
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    @property
    def runs(self) -> Path:
        """The run pool: --runs, or OUT/runs."""
        return Path(self.runs_dir) if self.runs_dir is not None else self.out_dir / "runs"

    def recipe(self, seed: int, base: str = "cifar10") -> Recipe:
        """The arms' recipe: `base` scaled to the experiment's iterations, with its seed,
        precision and batch size."""
        recipe = study_recipe(self.iterations, seed, get_recipe(base))
        if self.batch_size is not None:
            recipe = replace(recipe, batch_size=self.batch_size)
        return recipe if self.precision is None else replace(recipe, precision=self.precision)

    def command(self, command: str, name: str, *extra: str) -> str:
        """The command line that wrote the report; from Python, the command that would."""
        if sys.argv[1:2] == [command]:
            return " ".join(["reslab", *sys.argv[1:]])
        return " ".join(["reslab", command, name, "--data", self.data, "--out", str(self.out_dir),
                         *extra, "--iterations", str(self.iterations), "--seeds", str(self.seeds)])


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment, trained once per seed."""

    label: str
    spec: RunSpec

    def run_name(self) -> str:
        s = self.spec
        parts = [s.model]
        if s.shortcut is not None:
            parts.append(s.shortcut)
        if s.layers_per_block is not None:
            parts.append(f"k{s.layers_per_block}")
        if s.recipe.precision != Recipe.precision:  # not "auto": named, as no older run is
            parts.append(s.recipe.precision)
        if s.recipe.batch_size != RECIPES.get(s.recipe.name, Recipe()).batch_size:
            parts.append(f"b{s.recipe.batch_size}")
        parts += [f"{s.recipe.iterations}it", f"seed{s.recipe.seed}"]
        return "-".join(parts)


def run_arms(arms: Sequence[Arm], exp: Experiment, data: Dataset | None) -> list[dict[str, Any]]:
    """Train (or reuse, or resume) every arm; with report_only, collect the finished ones."""
    results = []
    for arm in arms:
        run_dir = exp.runs / arm.run_name()
        summary_path = run_dir / "summary.json"
        if exp.report_only:
            if not summary_path.exists():
                print(f"note: {run_dir} is not finished; left out of the report", file=sys.stderr)
                continue
            summary = json.loads(summary_path.read_text())
        else:
            print(f"== {arm.label} (seed {arm.spec.recipe.seed}): {run_dir}")
            summary = train(arm.spec, run_dir, data=data, options=exp.options)
        summary = dict(summary, label=arm.label, run=arm.run_name(), hardware=_hardware(run_dir))
        results.append(summary)
    return results


def _hardware(run_dir: Path) -> str:
    """"AMD EPYC, 2 cores, CPU only" or the GPU's name, from the run's env.json; a run resumed
    on other hardware names each, in order ("NVIDIA H200, then AMD EPYC, 2 cores, CPU only")."""
    try:
        env = json.loads((Path(run_dir) / "env.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    names: list[str] = []
    for start in [env, *env.get("resumes", [])]:
        if start.get("gpu"):
            name = str(start["gpu"])
        else:
            cores = f", {start['cpu_count']} cores" if start.get("cpu_count") else ""
            name = f"{start.get('cpu') or 'unknown CPU'}{cores}, CPU only"
        if name not in names:
            names.append(name)
    return ", then ".join(names)


def unfinished(arms: Sequence[Arm], runs_dir: Path) -> list[str]:
    """Lines naming the arms whose runs are not finished, with how far each got."""
    lines = []
    for arm in arms:
        run_dir = Path(runs_dir) / arm.run_name()
        if (run_dir / "summary.json").exists():
            continue
        step = 0
        if (run_dir / "metrics.jsonl").exists():
            records = read_metrics(run_dir)
            step = records[-1]["step"] if records else 0
        lines.append(f"- {arm.label} (seed {arm.spec.recipe.seed}): iteration {step:,} of "
                     f"{arm.spec.recipe.iterations:,} in `{arm.run_name()}`; rerun the command "
                     "without --report-only to finish it")
    return lines


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def seed_stats(values: Sequence[float]) -> str:
    """Table 6's style: best (mean ± std) over seeds, in percent; the value alone for one seed."""
    if len(values) == 1:
        return pct(values[0])
    mean = statistics.mean(values)
    std = statistics.stdev(values)
    return f"{pct(min(values))} ({pct(mean)} ± {pct(std)})"


def by_label(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    return groups


def _provenance(results: Sequence[dict[str, Any]], data: str, command: str) -> list[str]:
    env = environment(resolve_device("auto"))
    wall = sum(r.get("wall_time_s", 0.0) for r in results)
    # A resumed run was trained by every commit that resumed it, not only the first.
    commits = sorted({c for r in results
                      for c in (r.get("commit") or "unknown", *r.get("resumed_at_commits", ()))})
    cpus = sorted({r["hardware"] for r in results})  # set by run_arms
    return [
        f"- data: **{data}** (the paper's figures are on CIFAR-10 or ImageNet; ours are on the "
        "data named here)",
        f"- command: `{command}`",
        f"- commits that trained the runs (resumes included): "
        f"{', '.join(c[:10] for c in commits)}; "
        f"report written at {(env['commit'] or 'unknown')[:10]}",
        f"- hardware: {'; '.join(cpus)}",
        f"- wall time of the runs: {wall / 3600:.2f} h in total",
        "- errors are at the final iteration (never the best seen on the test set); training "
        "error is measured on the augmented batches of the last 1% of the run",
    ]


def runs_table(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| net | params | iterations | seeds | final train error % | final test error % | "
        "paper CIFAR-10 test error % |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rs in by_label(results).items():
        r0 = rs[0]
        # Table 6's nets are option A with two-layer blocks; other arms have no paper figure.
        # Summaries written before layers_per_block was recorded are all two-layer nets.
        as_table6 = r0["shortcut"] == "A" and r0.get("layers_per_block", 2) == 2
        paper = PAPER_TABLE6.get(r0["depth"]) if as_table6 else None
        if paper is not None and r0["depth"] == 110:
            paper_s = PAPER_TABLE6_110
        else:
            paper_s = "—" if paper is None else f"{paper:.2f}"
        lines.append(
            f"| {label} | {r0['params']:,} | {r0['iterations']:,} | {len(rs)} | "
            f"{seed_stats([r['final_train_error'] for r in rs])} | "
            f"{seed_stats([r['final_test_error'] for r in rs])} | {paper_s} |"
        )
    return lines


FIG6_PANELS = (("plain nets", "plain"), ("ResNets", "ResNet"))


def plot_fig6(
    results: Sequence[dict[str, Any]], runs_dir: Path, path: Path,
    panels: Sequence[tuple[str, str]] = FIG6_PANELS,
) -> None:
    """Fig. 6: training error dashed, test error bold; one panel per (title, label prefix),
    plain nets left and ResNets right by default."""
    matplotlib = require("matplotlib", "the report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = by_label(results)
    for ax, (title, prefix) in zip(axes[0], panels, strict=True):
        chosen = sorted(((k, v) for k, v in groups.items() if k.startswith(prefix)),
                        key=lambda kv: (kv[1][0]["depth"], kv[0]))
        for i, (label, rs) in enumerate(chosen):
            records = read_metrics(Path(runs_dir) / rs[0]["run"])  # first seed, like the paper
            c = colours[i % len(colours)]
            ax.plot([r["step"] for r in records], [100 * r["train_error"] for r in records],
                    "--", color=c, linewidth=1)
            ev = [r for r in records if "test_error" in r]
            ax.plot([r["step"] for r in ev], [100 * r["test_error"] for r in ev], "-", color=c,
                    linewidth=2.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if chosen:
            ax.legend()
        else:  # e.g. --report-only while those runs are still training
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    axes[0][0].set_ylabel("error (%)  — dashed: training, bold: test")
    top = max(100 * r["final_train_error"] for r in results) if results else 20
    axes[0][0].set_ylim(0, max(20.0, min(100.0, 2.5 * top)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compute_responses(
    results: Sequence[dict[str, Any]], runs_dir: Path, data: Dataset
) -> dict[str, list[float]]:
    """Per-layer response std of each arm's first seed, on the test set (Fig. 7)."""
    out = {}
    for label, rs in by_label(results).items():
        model, mean, std, *_ = load_trained(Path(runs_dir) / rs[0]["run"])
        out[label] = layer_responses(model, data.test_images, mean, std)
    return out


def write_outputs(
    out_dir: Path, title: str, results: Sequence[dict[str, Any]], sections: list[str],
    data_name: str, command: str,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("label", "model", "depth", "plain", "shortcut", "layers_per_block", "iterations",
            "params", "final_train_error", "final_test_error", "seed", "wall_time_s", "run",
            "commit", "cpu", "gpu")
    summary = [{k: r.get(k) for k in keys} | {k: v for k, v in r.items()
                                               if k.startswith("study_") or k.endswith("_error")}
               for r in results]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {title}", "", *_provenance(results, data_name, command), "", *sections, ""]
    (out_dir / "report.md").write_text("\n".join(lines))
