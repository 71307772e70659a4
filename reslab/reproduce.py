"""The paper's Table 6, Figure 6 and Figure 7 as functions that train what they need and write
reports: `DIR/report.md`, `DIR/summary.json` and PNG plots drawn like the paper's.

Their runs live in experiments.py's pool (`DIR/runs/` unless given), shared with the studies.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import load_dataset
from .experiments import (
    Arm,
    Experiment,
    by_label,
    compute_responses,
    pct,
    plot_fig6,
    run_arms,
    runs_table,
    unfinished,
    write_outputs,
)
from .train import RunSpec

DEFAULT_DEPTHS = {
    "table6": (20, 32, 44, 56, 110),
    "fig6": (20, 32, 44, 56),  # plain and ResNet; the paper adds ResNet-110 on the right
    "fig7": (20, 56),
}


def arms_for(kind: str, exp: Experiment, depths: Sequence[int]) -> list[Arm]:
    """Table 6: ResNets; Fig. 6 and 7: plain nets and ResNets of each depth."""
    families = ["resnet"] if kind == "table6" else ["plain", "resnet"]
    arms = []
    for family in families:
        for depth in depths:
            for seed in range(exp.seeds):
                spec = RunSpec(model=f"{family}{depth}", data=exp.data, recipe=exp.recipe(seed))
                label = f"{'plain' if family == 'plain' else 'ResNet'}-{depth}"
                arms.append(Arm(label, spec))
    return arms


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
                f"{pct(b)}% vs {pct(a)}% → {'agrees' if holds else 'does not agree'}"
            )
    for d in depths:
        p = _mean_final(results, f"plain-{d}", "final_train_error")
        r = _mean_final(results, f"ResNet-{d}", "final_train_error")
        if p is not None and r is not None:
            out.append(f"- the cure at depth {d} (ResNet below plain, paper: lower): {pct(r)}% vs "
                       f"{pct(p)}% → {'agrees' if r < p else 'does not agree'}")
    return out


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


def reproduce(kind: str, exp: Experiment, depths: Sequence[int] | None = None) -> Path:
    """Run `table6`, `fig6` or `fig7` and write its report; returns report.md."""
    if kind not in DEFAULT_DEPTHS:
        raise ValueError(f"unknown experiment {kind!r}; valid: {', '.join(DEFAULT_DEPTHS)}")
    depths = tuple(depths or DEFAULT_DEPTHS[kind])
    data, out_dir, runs_dir = exp.data, exp.out_dir, exp.runs
    command = exp.command("reproduce", kind, "--depths", *map(str, depths))
    dataset = None if exp.report_only and kind != "fig7" else load_dataset(
        data, skip_bad_images=exp.options.skip_bad_images)
    t0 = time.time()
    arms = arms_for(kind, exp, depths)
    results = run_arms(arms, exp, dataset)
    if not exp.report_only:
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
