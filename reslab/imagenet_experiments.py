"""The paper's ImageNet experiments (Sec. 4.1) as functions that train what they need and write
reports beside the paper's numbers, like the CIFAR ones (reproduce.py), in the same run pool:

- `fig4` / `table2`: plain-18/34 against ResNet-18/34 (option A), training and centre-crop
  validation error curves (Fig. 4) and 10-crop top-1 error (Table 2);
- `table3`: plain-34, ResNet-34 with shortcut options A, B and C, ResNet-50/101/152 (B),
  10-crop top-1 and top-5 error;
- `table4`: the fully convolutional multi-scale protocol for ResNet-34 B/C and 50/101/152.

Each arm is Sec. 3.4's recipe (`imagenet`: lr divided on plateaus) scaled to --iterations; the
protocols' errors are computed once per finished run and kept in the report folder
(`protocols.json`), so --report-only rewrites the reports without evaluating again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import ImageTree, open_data
from .experiments import (
    Arm,
    Experiment,
    by_label,
    pct,
    plot_fig6,
    run_arms,
    unfinished,
    write_outputs,
)
from .train import RunSpec, model_depth
from .trained import load_trained

# (label, model, shortcut) of each experiment's arms (docs/paper.md).
_FIG4 = [("plain-18", "plain18", None), ("plain-34", "plain34", None),
         ("ResNet-18", "resnet18", "A"), ("ResNet-34", "resnet34", "A")]
ARMS: dict[str, list[tuple[str, str, str | None]]] = {
    "fig4": _FIG4, "table2": _FIG4,
    "table3": [("plain-34", "plain34", None), ("ResNet-34 A", "resnet34", "A"),
               ("ResNet-34 B", "resnet34", "B"), ("ResNet-34 C", "resnet34", "C"),
               ("ResNet-50", "resnet50", "B"), ("ResNet-101", "resnet101", "B"),
               ("ResNet-152", "resnet152", "B")],
    "table4": [("ResNet-34 B", "resnet34", "B"), ("ResNet-34 C", "resnet34", "C"),
               ("ResNet-50", "resnet50", "B"), ("ResNet-101", "resnet101", "B"),
               ("ResNet-152", "resnet152", "B")],
}
PROTOCOL = {"fig4": "10-crop", "table2": "10-crop", "table3": "10-crop", "table4": "multi-scale"}
# ImageNet validation error (%), top-1 and top-5 where the paper gives it (docs/paper.md).
PAPER: dict[str, dict[str, tuple[float, float | None]]] = {
    "table2": {"plain-18": (27.94, None), "plain-34": (28.54, None), "ResNet-18": (27.88, None),
               "ResNet-34": (25.03, None)},
    "table3": {"plain-34": (28.54, 10.02), "ResNet-34 A": (25.03, 7.76),
               "ResNet-34 B": (24.52, 7.46), "ResNet-34 C": (24.19, 7.40),
               "ResNet-50": (22.85, 6.71), "ResNet-101": (21.75, 6.05),
               "ResNet-152": (21.43, 5.71)},
    "table4": {"ResNet-152": (19.38, 4.49)},
}
PAPER["fig4"] = PAPER["table2"]


def arms_for(kind: str, exp: Experiment, depths: Sequence[int] | None) -> list[Arm]:
    chosen = [a for a in ARMS[kind] if not depths or model_depth(a[1]) in depths]
    if not chosen:
        valid = sorted({model_depth(m) for _, m, _ in ARMS[kind]})
        raise ValueError(f"--depths {' '.join(map(str, depths))} selects no arm of {kind}; "
                         f"its depths are {', '.join(map(str, valid))}")
    return [Arm(label, RunSpec(model=model, data=exp.data, shortcut=shortcut,
                               recipe=exp.recipe(seed, base="imagenet")))
            for label, model, shortcut in chosen for seed in range(exp.seeds)]


def _protocol_errors(results: list[dict[str, Any]], exp: Experiment, tree: ImageTree | None,
                     protocol: str) -> None:
    """Each result's `protocol` top-1/top-5, from protocols.json or evaluated now (and kept)."""
    path = exp.out_dir / "protocols.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    for r in results:
        key = f"{r['run']} {protocol}"
        if key not in cache:
            if tree is None:
                continue  # --report-only: reported once evaluated
            model, mean, std, *_ = load_trained(exp.runs / r["run"])
            e = tree.evaluate(model, mean, std, protocol=protocol, precision=r["precision"],
                              workers=exp.options.workers,
                              skip_bad_images=exp.options.skip_bad_images)
            cache[key] = {"top1_error": e["test_error"], "top5_error": e["test_top5_error"],
                          "images": e["images"]}
            exp.out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=2) + "\n")
        r[f"{protocol}_top1_error"] = cache[key]["top1_error"]
        r[f"{protocol}_top5_error"] = cache[key]["top5_error"]


def _table(kind: str, results: list[dict[str, Any]], protocol: str) -> list[str]:
    lines = [f"| net | params | iterations | final train error % | centre-crop val top-1 % | "
             f"{protocol} top-1 % | {protocol} top-5 % | paper top-1 % | paper top-5 % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in by_label(results).items():
        r = rs[0]
        paper = PAPER[kind].get(label, (None, None))
        top1, top5 = (f"{protocol}_top1_error", f"{protocol}_top5_error")
        ours = [pct(r[k]) if r.get(k) is not None else "not evaluated" for k in (top1, top5)]
        if r.get(top1) is not None and r.get(top5) is None:
            ours[1] = "n/a (≤ 5 classes)"  # every label is in a top 5 of 5
        lines.append(
            f"| {label} | {r['params']:,} | {r['iterations']:,} | {pct(r['final_train_error'])} "
            f"| {pct(r['final_test_error'])} | {ours[0]} | {ours[1]} | "
            + " | ".join("—" if v is None else f"{v:.2f}" for v in paper) + " |")
    return lines


def _claims(results: list[dict[str, Any]], protocol: str) -> list[str]:
    """Fig. 4 / Table 2's claims on our numbers."""
    got = {label: rs[0] for label, rs in by_label(results).items()}
    key = f"{protocol}_top1_error"
    out = []
    for deep, shallow, expect, what in (("plain-34", "plain-18", "higher", "degradation"),
                                        ("ResNet-34", "ResNet-18", "lower", "depth helps"),
                                        ("ResNet-34", "plain-34", "lower", "the cure")):
        if deep in got and shallow in got:
            for name, k in (("training", "final_train_error"), (f"{protocol} val", key)):
                a, b = got[deep].get(k), got[shallow].get(k)
                if a is None or b is None:
                    continue
                holds = a > b if expect == "higher" else a < b
                out.append(f"- {what}, {name} error ({deep} vs {shallow}, paper: {expect}): "
                           f"{pct(a)}% vs {pct(b)}% → {'agrees' if holds else 'does not agree'}")
    return out


def reproduce_imagenet(kind: str, exp: Experiment, depths: Sequence[int] | None = None) -> Path:
    """Run `fig4`, `table2`, `table3` or `table4` on an image tree and write its report."""
    if kind not in ARMS:
        raise ValueError(f"unknown experiment {kind!r}; valid: {', '.join(ARMS)}")
    protocol = PROTOCOL[kind]
    tree = None
    if not exp.report_only:
        tree = open_data(exp.data, loader="stream")
    arms = arms_for(kind, exp, depths)
    t0 = time.time()
    results = run_arms(arms, exp, tree)
    if not exp.report_only:
        print(f"all runs finished or reused in {time.time() - t0:.0f} s")
    _protocol_errors(results, exp, tree, protocol)
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"## Errors ({protocol} testing; the paper's on ImageNet's 50k validation "
                "images)", "", *_table(kind, results, protocol), ""]
    if pending := unfinished(arms, exp.runs):
        sections += ["## Runs not finished yet", "", *pending, ""]
    if kind in ("fig4", "table2"):
        if results:
            plot_fig6(results, exp.runs, exp.out_dir / "fig4.png",
                      panels=(("plain nets", "plain"), ("ResNets", "ResNet")))
        checked = _claims(results, protocol) or ["- not enough finished runs to compare yet"]
        sections += ["## The paper's claims on our numbers", "", *checked, "",
                     "![Figure 4: dashed training error, bold centre-crop validation error]"
                     "(fig4.png)", ""]
    titles = {"fig4": "Figure 4", "table2": "Table 2", "table3": "Table 3", "table4": "Table 4"}
    command = exp.command("reproduce", kind, *(["--depths", *map(str, depths)] if depths else []))
    write_outputs(exp.out_dir, f"{titles[kind]} (ImageNet experiments on {exp.data})", results,
                  sections, exp.data, command)
    return exp.out_dir / "report.md"
