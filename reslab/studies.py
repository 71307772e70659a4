"""Beyond the paper: the seed's two open questions as studies (docs/paper.md, last section).

1. block-depth: residual functions of 1, 2 and 3 conv layers at a matched total depth of 56
   weighted layers (18, 9 and 6 blocks per stage), beside their plain twin (one net for every k).
2. shortcuts: identity with zero padding (A), projection where needed (B), projection everywhere
   (C), gated (highway-like), learned scalar, fixed 0.5 scaling, and none (plain).

They share experiments.py's run pool, reports and plots with `reproduce`; an arm whose
configuration equals a run of another study or of `reproduce` (ResNet-56 with option A, plain-56)
is the same run folder and trains once.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .blocks import ResidualBlock
from .complexity import describe
from .data import Dataset, load_dataset, normalize
from .experiments import (
    Arm,
    Experiment,
    by_label,
    compute_responses,
    plot_fig6,
    run_arms,
    runs_table,
    seed_stats,
    unfinished,
    write_outputs,
)
from .models import default_shortcut
from .runfolder import read_metrics
from .train import RunSpec
from .trained import load_trained

SHORTCUT_ARMS = {
    "A": "identity, zero-padding where dimensions grow (A)",
    "B": "projection where dimensions grow (B)",
    "C": "projection on every shortcut (C)",
    "gated": "gated, highway-like",
    "scaled": "learned scalar λ",
    "fixed": "fixed scaling 0.5",
    "none": "none (plain)",
}
STUDIES = ("block-depth", "shortcuts", "mlp-depth", "rnn-depth")  # the last two: depth_studies
# Each arm is compared with the paper's design at its depth: two-layer blocks, option A.
REFERENCE = {"block-depth": "ResNet-{depth} k=2", "shortcuts": "d{depth} A"}


def canonical(spec: RunSpec) -> RunSpec:
    """Spell a configuration the way `reproduce` does, so identical runs share a folder."""
    return replace(
        spec,
        shortcut=None if spec.shortcut == default_shortcut(spec.model) else spec.shortcut,
        layers_per_block=None if spec.layers_per_block == 2 else spec.layers_per_block,
    )


def study_arms(study: str, exp: Experiment, depths: Sequence[int]) -> list[Arm]:
    arms, data = [], exp.data
    for seed in range(exp.seeds):
        recipe = exp.recipe(seed)
        for depth in depths:
            if study == "block-depth":
                # Without shortcuts a "block" only groups conv-BN-ReLU layers: plain-56 with
                # k = 1, 2 or 3 is one network (same layers, order and initialisation), so the
                # plain twin of every k is one arm, trained once.
                spec = RunSpec(model=f"plain{depth}", data=data, recipe=recipe)
                arms.append(Arm(f"plain-{depth} (every k)", canonical(spec)))
                for k in (1, 2, 3):
                    spec = RunSpec(model=f"resnet{depth}", data=data, recipe=recipe,
                                   layers_per_block=k)
                    arms.append(Arm(f"ResNet-{depth} k={k}", canonical(spec)))
            else:
                for shortcut in SHORTCUT_ARMS:
                    model = f"plain{depth}" if shortcut == "none" else f"resnet{depth}"
                    spec = RunSpec(model=model, data=data, recipe=recipe, shortcut=shortcut)
                    arms.append(Arm(f"d{depth} {shortcut}", canonical(spec)))
    return arms


@torch.no_grad()
def what_the_network_chose(run_dir: Path, data: Dataset) -> dict[str, Any]:
    """Per stage: the gates' mean opening T on the test set, or the learned scalars λ."""
    model, mean, std, *_ = load_trained(run_dir)
    out: dict[str, Any] = {}
    stages = model.stages()
    scales = {f"stage{s + 1}": [b.shortcut_scale.item() for b in stage
                                if isinstance(b, ResidualBlock) and b.mapping == "scaled"]
              for s, stage in enumerate(stages)}
    if any(scales.values()):
        out["lambda_per_stage"] = {k: statistics.mean(v) for k, v in scales.items() if v}
        out["lambda_per_block"] = scales
    gates = {f"stage{s + 1}": [b for b in stage if getattr(b, "mapping", "") == "gated"]
             for s, stage in enumerate(stages)}
    if any(gates.values()):
        sums: dict[str, list[float]] = {k: [] for k in gates}
        handles = []
        for stage_name, blocks in gates.items():
            for b in blocks:
                def hook(_m, _i, o, stage_name=stage_name):
                    sums[stage_name].append(torch.sigmoid(o).mean().item())
                handles.append(b.gate.register_forward_hook(hook))
        try:
            for start in range(0, len(data.test_images), 500):
                x = normalize(data.test_images[start : start + 500], mean, std)
                model(x.contiguous(memory_format=torch.channels_last))
        finally:
            for h in handles:
                h.remove()
        # T weighs F(x); 1 - T the shortcut: a mean T of 0.1 means 90% carried by the shortcut.
        out["gate_opening_per_stage"] = {k: statistics.mean(v) for k, v in sums.items() if v}
        # Each block's mean over the test batches (the hooks append in block order per batch).
        out["gate_opening_per_block"] = {
            k: [statistics.mean(v[i::len(gates[k])]) for i in range(len(gates[k]))]
            for k, v in sums.items() if v}
    return out


def _gap(values: Sequence[float], ref: Sequence[float]) -> str:
    """Mean difference in points, with its standard error when both sides have seeds to spare."""
    gap = 100 * (statistics.mean(values) - statistics.mean(ref))
    if len(values) < 2 or len(ref) < 2:
        return f"{gap:+.2f}"
    se = 100 * (statistics.variance(values) / len(values)
                + statistics.variance(ref) / len(ref)) ** 0.5
    return f"{gap:+.2f} ± {se:.2f}"


def _order(curves: Sequence[Sequence[dict[str, float]]],
           ref: Sequence[Sequence[dict[str, float]]], key: str) -> str:
    """At each evaluation: is the arm's mean below all of the reference's seeds, among, or above?"""
    steps = sorted(set.intersection(*({e["step"] for e in c} for c in (*curves, *ref))))
    if not steps:
        return "—"
    at = [{e["step"]: e[key] for e in c} for c in (*curves, *ref)]
    ours, theirs = at[:len(curves)], at[len(curves):]
    marks = []
    for step in steps:
        mean = statistics.mean(c[step] for c in ours)
        lo, hi = min(c[step] for c in theirs), max(c[step] for c in theirs)
        marks.append(0 if mean < lo else 2 if mean > hi else 1)

    def count(ms: Sequence[int]) -> str:
        return " · ".join(str(ms.count(i)) for i in range(3))

    half = marks[len(marks) // 2:]
    return f"{count(marks)} (last {len(half)}: {count(half)})"


def versus_reference(study: str, results: Sequence[dict[str, Any]], runs_dir: Path) -> list[str]:
    """Each arm against the paper's design at its depth: final gaps and the order at every
    evaluation, so that a reader can tell a difference from seed noise (the report's numbers)."""
    groups = by_label(results)
    curves = {label: [[e for e in read_metrics(runs_dir / r["run"]) if "test_error" in e]
                      for r in rs] for label, rs in groups.items()}
    lines = []
    for label, rs in groups.items():
        ref = REFERENCE[study].format(depth=rs[0]["depth"])
        if label == ref or ref not in groups:
            continue
        theirs = groups[ref]
        lines.append(
            f"| {label} | {ref} | {len(rs)} / {len(theirs)} | "
            + " | ".join(_gap([r[k] for r in rs], [r[k] for r in theirs])
                         for k in ("final_test_error", "final_train_error"))
            + " | " + " | ".join(_order(curves[label], curves[ref], k)
                                 for k in ("test_error", "train_error")) + " |")
    if not lines:
        return []
    return [
        "## Against the paper's design, seed noise included", "",
        "Gaps are the arm's mean minus the reference's, in points of error (± the standard error "
        "of that difference where both have two or more seeds). The order columns count the "
        "evaluations at which the arm's mean error was below all of the reference's seeds · "
        "among them · above all of them, over the whole run and over its second half.", "",
        "| arm | reference | seeds | final test error gap | final train error gap | "
        "test error: below · among · above | train error: below · among · above |",
        "|---|---|---|---|---|---|---|",
        *lines, "",
    ]


def run_study(study: str, exp: Experiment, depths: Sequence[int] | None = None) -> Path:
    """Run a study and write DIR/report.md, DIR/summary.json and its plots."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; valid: {', '.join(STUDIES)}")
    if study in ("mlp-depth", "rnn-depth"):
        from .depth_studies import run_depth_study

        return run_depth_study(study, exp, depths)
    depths = tuple(depths or ((56,) if study == "block-depth" else (56, 20)))
    if study == "block-depth" and any((d - 2) % 18 for d in depths):
        raise ValueError(f"block-depth needs depths 18n+2 (e.g. 20, 56, 110) so that 1-, 2- and "
                         f"3-layer blocks reach the same depth; got {list(depths)}")
    data, out_dir, runs_dir = exp.data, exp.out_dir, exp.runs
    dataset = load_dataset(data, skip_bad_images=exp.options.skip_bad_images)
    arms = study_arms(study, exp, depths)
    results = run_arms(arms, exp, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = exp.command("study", study)
    for r in results:
        spec = next(a.spec for a in arms if a.run_name() == r["run"])
        info = describe(spec.model, input_size=dataset.image_size[0],
                        in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        shortcut=spec.shortcut, layers_per_block=spec.layers_per_block)
        r["study_multiply_adds"] = info.multiply_adds
        r["study_layers_per_block"] = spec.layers_per_block or 2
        r["study_shortcut"] = spec.shortcut or default_shortcut(spec.model)
        r["study_choice"] = what_the_network_chose(runs_dir / r["run"], dataset)

    pending = unfinished(arms, runs_dir)
    sections = ["## Final errors", "", *runs_table(results), "",
                *(["## Runs not finished yet", "", *pending, ""] if pending else []),
                *versus_reference(study, results, runs_dir),
                "## Cost and what the network chose", "",
                "| arm | params | multiply-adds / image | final test error % | chosen |",
                "|---|---|---|---|---|"]
    for label, rs in by_label(results).items():
        choice = rs[0]["study_choice"]
        chosen = "; ".join(
            f"{kind.replace('_per_stage', '')}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items())
            for kind, d in choice.items() if kind.endswith("_per_stage")
        ) or "—"
        sections.append(
            f"| {label} | {rs[0]['params']:,} | {rs[0]['study_multiply_adds'] / 1e6:.1f}M | "
            f"{seed_stats([r['final_test_error'] for r in rs])} | {chosen} |"
        )
    chosen_blocks = [(r, kind.replace("_per_block", ""), d) for r in results
                     for kind, d in r["study_choice"].items() if kind.endswith("_per_block")]
    if chosen_blocks:
        # Stage means hide sign flips and single outlying blocks; the reader sees every block.
        n = max(len(d) for *_, d in chosen_blocks)  # 3 stages on CIFAR nets, 4 on ImageNet's
        sections += ["", "### What the network chose, block by block", "",
                     "| arm | seed | value | "
                     + " | ".join(f"stage {s} blocks" for s in range(1, n + 1)) + " |",
                     "|---|---|---|" + "---|" * n]
        sections += [f"| {r['label']} | {r['seed']} | {kind} | " + " | ".join(
            ", ".join(f"{x:.2f}" for x in d.get(f"stage{s}", [])) for s in range(1, n + 1)) + " |"
            for r, kind, d in chosen_blocks]
    if results:
        if study == "block-depth":
            panels = (("plain nets", "plain"), ("ResNets", "ResNet"))
        else:
            panels = tuple((f"shortcuts at depth {d}", f"d{d} ") for d in depths)
        plot_fig6(results, runs_dir, out_dir / "curves.png", panels=panels)
        responses = compute_responses(results, runs_dir, dataset)
        (out_dir / "responses.json").write_text(json.dumps(responses, indent=2) + "\n")
        sections += ["", "![curves](curves.png)", ""]
    title = {"block-depth": "Study: layers per residual block",
             "shortcuts": "Study: shortcut mappings"}[study] + f" on {data}"
    write_outputs(out_dir, title, results, sections, data, command)
    return out_dir / "report.md"
