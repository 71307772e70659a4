"""The paper's Table 6, Figure 6 and Figure 7 as functions that train what they need and write
reports: `DIR/report.md`, `DIR/summary.json` and PNG plots drawn like the paper's.

Runs live in a pool (`DIR/runs/` unless given) named by their configuration, so a finished run is
reused, an unfinished one resumed, and two studies that need the same run train it once.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .data import Dataset, load_dataset
from .evaluate import layer_responses
from .recipes import Recipe, get_recipe
from .runfolder import environment
from .train import RunSpec, load_trained, resolve_device, train

# CIFAR-10 test error (%) of Table 6; the plain nets' are only drawn (Fig. 6).
PAPER_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_TABLE6_110 = "6.43 (6.61 ± 0.16)"
DEFAULT_DEPTHS = {
    "table6": (20, 32, 44, 56, 110),
    "fig6": (20, 32, 44, 56),  # plain and ResNet; the paper adds ResNet-110 on the right
    "fig7": (20, 56),
}


@dataclass(frozen=True)
class Arm:
    """One configuration of a study, trained once per seed."""

    label: str
    spec: RunSpec

    def run_name(self) -> str:
        s = self.spec
        parts = [s.model]
        if s.shortcut is not None:
            parts.append(s.shortcut)
        if s.layers_per_block is not None:
            parts.append(f"k{s.layers_per_block}")
        parts += [f"{s.recipe.iterations}it", f"seed{s.recipe.seed}"]
        return "-".join(parts)


def study_recipe(iterations: int, seed: int, base: Recipe | None = None) -> Recipe:
    """The paper's recipe scaled to `iterations`, evaluated 20 times and logged every 1%."""
    base = (base or get_recipe("cifar10")).with_iterations(iterations)
    every = max(1, iterations // 20)
    return replace(base, seed=seed, eval_every=every, checkpoint_every=every, log_every=0)


def arms_for(
    kind: str, data: str, depths: Sequence[int], iterations: int, seeds: int
) -> list[Arm]:
    """Table 6: ResNets; Fig. 6 and 7: plain nets and ResNets of each depth."""
    families = ["resnet"] if kind == "table6" else ["plain", "resnet"]
    arms = []
    for family in families:
        for depth in depths:
            for seed in range(seeds):
                spec = RunSpec(model=f"{family}{depth}", data=data,
                               recipe=study_recipe(iterations, seed))
                label = f"{'plain' if family == 'plain' else 'ResNet'}-{depth}"
                arms.append(Arm(label, spec))
    return arms


def run_arms(
    arms: Sequence[Arm], runs_dir: Path, *, data: Dataset | None, report_only: bool,
    device: str = "auto",
    cuda_graphs: bool | None = None,
) -> list[dict[str, Any]]:
    """Train (or reuse, or resume) every arm; with report_only, collect the finished ones."""
    results = []
    for arm in arms:
        run_dir = Path(runs_dir) / arm.run_name()
        summary_path = run_dir / "summary.json"
        if report_only:
            if not summary_path.exists():
                print(f"note: {run_dir} is not finished; left out of the report", file=sys.stderr)
                continue
            summary = json.loads(summary_path.read_text())
        else:
            print(f"== {arm.label} (seed {arm.spec.recipe.seed}): {run_dir}")
            summary = train(arm.spec, run_dir, data=data, device=device, cuda_graphs=cuda_graphs)
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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def seed_stats(values: Sequence[float]) -> str:
    """Table 6's style: best (mean ± std) over seeds, in percent; the value alone for one seed."""
    if len(values) == 1:
        return _pct(values[0])
    mean = statistics.mean(values)
    std = statistics.stdev(values)
    return f"{_pct(min(values))} ({_pct(mean)} ± {_pct(std)})"


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
        f"- data: **{data}** (the paper's figures are CIFAR-10; ours are on the data named here)",
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


def _mean_final(results, label: str, key: str) -> float | None:
    rs = by_label(results).get(label)
    return statistics.mean(r[key] for r in rs) if rs else None


def claims(results: Sequence[dict[str, Any]]) -> list[str]:
    """The paper's Fig. 6 claims, checked on our numbers (final training error, mean of seeds)."""
    out = []
    depths = sorted({r["depth"] for r in results})
    for shallow, deep in zip(depths, depths[1:], strict=False):
        for fam, verb_ok, expect in (("plain", "degradation", "higher"),
                                     ("ResNet", "depth helps", "lower")):
            a = _mean_final(results, f"{fam}-{shallow}", "final_train_error")
            b = _mean_final(results, f"{fam}-{deep}", "final_train_error")
            if a is None or b is None:
                continue
            holds = b > a if expect == "higher" else b < a
            out.append(
                f"- {verb_ok} ({fam}-{deep} vs {fam}-{shallow}, paper: {expect}): "
                f"{_pct(b)}% vs {_pct(a)}% → {'agrees' if holds else 'does not agree'}"
            )
    for d in depths:
        p = _mean_final(results, f"plain-{d}", "final_train_error")
        r = _mean_final(results, f"ResNet-{d}", "final_train_error")
        if p is not None and r is not None:
            out.append(f"- the cure at depth {d} (ResNet below plain, paper: lower): {_pct(r)}% vs "
                       f"{_pct(p)}% → {'agrees' if r < p else 'does not agree'}")
    return out


FIG6_PANELS = (("plain nets", "plain"), ("ResNets", "ResNet"))


def plot_fig6(
    results: Sequence[dict[str, Any]], runs_dir: Path, path: Path,
    panels: Sequence[tuple[str, str]] = FIG6_PANELS,
) -> None:
    """Fig. 6: training error dashed, test error bold; one panel per (title, label prefix),
    plain nets left and ResNets right by default."""
    import matplotlib

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


def plot_fig7(responses: dict[str, list[float]], path: Path) -> None:
    """Fig. 7: std of each 3x3 layer's response, in layer order (top) and sorted (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    for label, stds in responses.items():
        style = "--" if label.startswith("plain") else "-"
        top.plot(range(1, len(stds) + 1), stds, style, label=label, linewidth=1.5)
        bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, label=label,
                    linewidth=1.5)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compute_responses(
    results: Sequence[dict[str, Any]], runs_dir: Path, data: Dataset
) -> dict[str, list[float]]:
    """Per-layer response std of each arm's first seed, on the test set."""
    out = {}
    for label, rs in by_label(results).items():
        model, mean, std, _ = load_trained(Path(runs_dir) / rs[0]["run"])
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
    summary = [{k: r.get(k) for k in keys} | {k: v for k, v in r.items() if k.startswith("study_")}
               for r in results]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {title}", "", *_provenance(results, data_name, command), "", *sections, ""]
    (out_dir / "report.md").write_text("\n".join(lines))


def reproduce(
    kind: str,
    *,
    data: str,
    out_dir: Path,
    depths: Sequence[int] | None = None,
    iterations: int = 64_000,
    seeds: int = 1,
    runs_dir: Path | None = None,
    report_only: bool = False,
    device: str = "auto",
    cuda_graphs: bool | None = None,
) -> Path:
    """Run `table6`, `fig6` or `fig7` on `data` and write its report; returns report.md."""
    if kind not in DEFAULT_DEPTHS:
        raise ValueError(f"unknown experiment {kind!r}; valid: {', '.join(DEFAULT_DEPTHS)}")
    if seeds < 1 or iterations < 1:
        raise ValueError("--seeds and --iterations must be >= 1")
    depths = tuple(depths or DEFAULT_DEPTHS[kind])
    out_dir = Path(out_dir)
    runs_dir = Path(runs_dir) if runs_dir is not None else out_dir / "runs"
    command = " ".join(["reslab", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] else (
        f"reslab reproduce {kind} --data {data} --out {out_dir} --depths "
        f"{' '.join(map(str, depths))} --iterations {iterations} --seeds {seeds}")
    dataset = None if report_only and kind != "fig7" else load_dataset(data)
    t0 = time.time()
    arms = arms_for(kind, data, depths, iterations, seeds)
    results = run_arms(arms, runs_dir, data=dataset, report_only=report_only, device=device,
                       cuda_graphs=cuda_graphs)
    if not report_only:
        print(f"all runs finished or reused in {time.time() - t0:.0f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = ["## Final errors", "", *runs_table(results), ""]
    pending = unfinished(arms, runs_dir)
    if pending:
        sections += ["## Runs not finished yet", "", *pending, ""]
    if kind == "table6":
        title = f"Table 6 (ResNets on {data})"
    elif kind == "fig6":
        title = f"Figure 6 (plain nets vs ResNets on {data})"
        if results:
            plot_fig6(results, runs_dir, out_dir / "fig6.png")
        checked = claims(results) or ["- not enough finished runs to compare yet"]
        sections += ["## The paper's claims on our numbers", "", *checked, "",
                     "![Figure 6](fig6.png)", ""]
    else:
        title = f"Figure 7 (layer responses on {data})"
        responses = compute_responses(results, runs_dir, dataset) if results else {}
        if responses:
            plot_fig7(responses, out_dir / "fig7.png")
            (out_dir / "responses.json").write_text(json.dumps(responses, indent=2) + "\n")
        sections += [
            "## Response std per 3x3 layer (after BN, before ReLU/addition; test set)", "",
            "| net | layers | mean std | max std |", "|---|---|---|---|",
            *[f"| {k} | {len(v)} | {statistics.mean(v):.3f} | {max(v):.3f} |"
              for k, v in responses.items()],
            "", "![Figure 7](fig7.png)", "",
        ]
    write_outputs(out_dir, title, results, sections, data, command)
    return out_dir / "report.md"
