"""The paper's experiments as one function, `reproduce(kind, ...)`, that trains what they need
and writes reports beside the paper's numbers: `DIR/report.md`, `DIR/summary.json` and PNG plots
drawn like the paper's.

- CIFAR-10 (Sec. 4.2) on small images in memory: `table6`, `fig6` (plain nets against ResNets)
  and `fig7` (layer responses);
- ImageNet (Sec. 4.1) on an image tree, streamed: `fig4` / `table2` (plain-18/34 against
  ResNet-18/34, option A; training and centre-crop validation curves, 10-crop top-1), `table3`
  (plain-34, ResNet-34 A/B/C, ResNet-50/101/152 B; 10-crop top-1 and top-5) and `table4` (the
  fully convolutional multi-scale protocol). Each arm is Sec. 3.4's recipe (lr divided on
  plateaus) scaled to --iterations; the protocols' errors are computed once per finished run
  and kept in the report folder (`protocols.json`), so --report-only does not evaluate again.

Their runs live in experiments.py's pool (`DIR/runs/` unless given), shared with the studies.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import ImageTree, load_dataset, open_data
from .experiments import (
    PAPER_TABLE6,
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
from .recipes import Recipe
from .runfolder import read_metrics
from .runtime import require
from .train import RunSpec, model_depth, warms_up
from .trained import load_trained

DEFAULT_DEPTHS = {
    "table6": (20, 32, 44, 56, 110),
    "fig6": (20, 32, 44, 56),  # plain and ResNet; the paper adds ResNet-110 on the right
    "fig7": (20, 56, 110),  # plain-20/56 and ResNet-20/56/110, as the paper draws it
}
# Fig. 7 draws no plain net this deep: plain-110 does not train (its error stays above 60%).
FIG7_DEEPEST_PLAIN = 56


def arms_for(kind: str, exp: Experiment, depths: Sequence[int]) -> list[Arm]:
    """Table 6: ResNets; Fig. 6: plain nets and ResNets of each depth; Fig. 7 the same, but
    ResNets only beyond depth 56 (the paper's Fig. 7 has ResNet-110 and no plain-110)."""
    families = ["resnet"] if kind == "table6" else ["plain", "resnet"]
    arms = []
    for family in families:
        for depth in depths:
            if kind == "fig7" and family == "plain" and depth > FIG7_DEEPEST_PLAIN:
                continue
            for seed in range(exp.seeds):
                spec = RunSpec(model=f"{family}{depth}", data=exp.data, recipe=exp.recipe(seed))
                label = f"{'plain' if family == 'plain' else 'ResNet'}-{depth}"
                arms.append(Arm(label, spec))
    return arms


# Below this many iterations, or with a test error near chance, a run's final errors say nothing
# about the paper's claims: the report says "too short to judge" instead of a verdict.
MIN_JUDGED_ITERATIONS = 500
NEAR_CHANCE = 0.8  # a test error above 80% of chance's (1 - 1/classes) is near chance


def _verdict(holds: bool, judged: bool = True) -> str:
    if not judged:
        return "too short to judge"
    return "agrees" if holds else "does not agree"


def _judged(results: Sequence[dict[str, Any]], labels: Sequence[str],
            num_classes: int | None) -> bool:
    """Whether every run of `labels` is long enough, and off chance, to carry a verdict."""
    chance = None if num_classes is None else 1 - 1 / num_classes
    return all(r.get("iterations", MIN_JUDGED_ITERATIONS) >= MIN_JUDGED_ITERATIONS
               and (chance is None or r["final_test_error"] < NEAR_CHANCE * chance)
               for r in results if r["label"] in labels)


def _mean_final(results, label: str, key: str) -> float | None:
    rs = by_label(results).get(label)
    return statistics.mean(r[key] for r in rs) if rs else None


def claims(results: Sequence[dict[str, Any]], runs_dir: Path | None = None,
           num_classes: int | None = None) -> list[str]:
    """The paper's Fig. 6 claims, checked on our numbers (final training error, mean of seeds);
    with `runs_dir`, also at how many of the logged points along the way each held (the paper:
    plain-56 above plain-20 "throughout"), from the first seeds' metrics."""
    out = []
    depths = sorted({r["depth"] for r in results})
    pairs = [(f"{fam}-{deep}", f"{fam}-{shallow}", verb, expect)
             for shallow, deep in zip(depths, depths[1:], strict=False)
             for fam, verb, expect in (("plain", "degradation", "higher"),
                                       ("ResNet", "depth helps", "lower"))]
    pairs += [(f"ResNet-{d}", f"plain-{d}", f"the cure at depth {d}", "lower") for d in depths]
    for first, second, verb, expect in pairs:
        b = _mean_final(results, first, "final_train_error")
        a = _mean_final(results, second, "final_train_error")
        if a is None or b is None:
            continue
        holds = b > a if expect == "higher" else b < a
        along = "" if runs_dir is None else _along_the_way(results, runs_dir, first, second,
                                                            expect)
        judged = _judged(results, (first, second), num_classes)
        out.append(f"- {verb} ({first} vs {second}, paper: {expect}): {pct(b)}% vs {pct(a)}% "
                   f"→ {_verdict(holds, judged)}{along}")
    return out


def _along_the_way(results: Sequence[dict[str, Any]], runs_dir: Path, first: str, second: str,
                   expect: str) -> str:
    """"; higher at 97 of 100 logged points": training error compared at each iteration both
    runs logged."""
    groups = by_label(results)
    curves = [{r["step"]: r["train_error"]
               for r in read_metrics(Path(runs_dir) / groups[label][0]["run"])
               if "train_error" in r} for label in (first, second)]
    steps = sorted(curves[0].keys() & curves[1].keys())
    if not steps:
        return ""
    a, b = curves
    held = sum(a[s] > b[s] if expect == "higher" else a[s] < b[s] for s in steps)
    return f"; {expect} at {held} of {len(steps)} logged points"


def ladder_claims(results: Sequence[dict[str, Any]], num_classes: int | None = None
                  ) -> list[str]:
    """Table 6's claim, each deeper ResNet testing lower, on our numbers (final test error,
    mean of seeds), beside the paper's pair where Table 6 has both depths."""
    out = []
    depths = sorted({r["depth"] for r in results if r["label"].startswith("ResNet-")})
    for shallow, deep in zip(depths, depths[1:], strict=False):
        a = _mean_final(results, f"ResNet-{shallow}", "final_test_error")
        b = _mean_final(results, f"ResNet-{deep}", "final_test_error")
        pa, pb = PAPER_TABLE6.get(shallow), PAPER_TABLE6.get(deep)
        paper = f"{pb:.2f}% vs {pa:.2f}%, lower" if pa and pb else "lower"
        judged = _judged(results, (f"ResNet-{shallow}", f"ResNet-{deep}"), num_classes)
        out.append(f"- deeper ResNets test lower (ResNet-{deep} vs ResNet-{shallow}, paper: "
                   f"{paper}): {pct(b)}% vs {pct(a)}% → {_verdict(b < a, judged)}")
    return out


def schedule(run_dir: Path) -> str:
    """The learning-rate schedule a run had, from its recipe.json, with the end of the 0.01
    warm-up (Sec. 4.2's ResNet-110) as its metrics.jsonl logged it."""
    spec = json.loads((Path(run_dir) / "recipe.json").read_text())
    recipe = {**vars(Recipe()), **spec["recipe"]}  # runs from before a field: its default
    base, milestones = recipe["lr"], recipe["milestones"]
    if recipe["lr_policy"] == "plateau":
        text = f"{base:g}, /10 when the error plateaus"
    else:
        text = f"{base:g}, /10 at {' and '.join(f'{m:,}' for m in milestones)}"
    # A record's lr is that of the last iteration it covers; before the first division any
    # record below the base rate is the warm-up.
    first_division = milestones[0] if recipe["lr_policy"] != "plateau" and milestones else None
    records = read_metrics(Path(run_dir))
    early = [r for r in records
             if "lr" in r and (first_division is None or r["step"] <= first_division)]
    ended = next((r["warmup_over_at"] for r in records if "warmup_over_at" in r), None)
    warmed = warms_up(spec["model"], recipe["warmup_min_depth"])
    if ended is not None or any(r["lr"] < base * (1 - 1e-6) for r in early) or (
            warmed and early):
        if ended is not None:
            over = f"over at iteration {ended:,}"
        else:  # runs from before the metrics kept the iteration: bounded by the records
            after = next((r["step"] for r in early if r["lr"] >= base * (1 - 1e-6)), None)
            over = f"over by iteration {after:,}" if after is not None else "never over"
        text = (f"{recipe['warmup_lr']:g} until training error < "
                f"{100 * recipe['warmup_until_error']:.0f}% ({over}), then {text}")
    return f"{text}; {recipe['iterations']:,} iterations, batch {recipe['batch_size']}"


def schedules(results: Sequence[dict[str, Any]], runs_dir: Path) -> list[str]:
    """One line per net (its first seed's run) naming the schedule it was trained with."""
    return [f"- {label}: {schedule(Path(runs_dir) / rs[0]['run'])}"
            for label, rs in by_label(results).items()]


def response_claims(responses: dict[str, list[float]]) -> list[str]:
    """Fig. 7's claims (Sec. 4.2) on our numbers, by the mean std over each net's layers:
    ResNets respond less than their plain counterparts, and deeper ResNets less still."""
    means = {label: statistics.mean(v) for label, v in responses.items()}
    depths = sorted({int(label.split("-")[1]) for label in means})
    out = []
    for d in depths:
        p, r = means.get(f"plain-{d}"), means.get(f"ResNet-{d}")
        if p is not None and r is not None:
            out.append(f"- ResNet-{d} vs plain-{d} (paper: smaller): {r:.3f} vs {p:.3f} → "
                       f"{_verdict(r < p)}")
    nets = [d for d in depths if f"ResNet-{d}" in means]
    for shallow, deep in zip(nets, nets[1:], strict=False):
        a, b = means[f"ResNet-{shallow}"], means[f"ResNet-{deep}"]
        out.append(f"- deeper ResNets respond less (ResNet-{deep} vs ResNet-{shallow}, paper: "
                   f"smaller): {b:.3f} vs {a:.3f} → {_verdict(b < a)}")
    return out


def plot_fig7(responses: dict[str, list[float]], path: Path) -> None:
    """Fig. 7: std of each 3x3 layer's response, in layer order (top) and sorted (bottom)."""
    matplotlib = require("matplotlib", "the report's plots")
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
    """Run one of the paper's experiments (KINDS) and write its report; returns report.md."""
    if kind not in KINDS:
        raise ValueError(f"unknown experiment {kind!r}; valid: {', '.join(KINDS)}")
    if kind in IMAGENET_ARMS:
        return _reproduce_imagenet(kind, exp, depths)
    depths = tuple(depths or DEFAULT_DEPTHS[kind])
    data, out_dir, runs_dir = exp.data, exp.out_dir, exp.runs
    command = exp.command("reproduce", kind, "--depths", *map(str, depths))
    dataset = None if exp.report_only and kind != "fig7" else load_dataset(
        data, skip_bad_images=exp.options.skip_bad_images)
    t0 = time.time()
    arms = arms_for(kind, exp, depths)
    results = run_arms(arms, exp, dataset)
    classes = None if dataset is None else dataset.num_classes
    if not exp.report_only:
        print(f"all runs finished or reused in {time.time() - t0:.0f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = ["## Final errors", "", *runs_table(results), ""]
    pending = unfinished(arms, runs_dir)
    if pending:
        sections += ["## Runs not finished yet", "", *pending, ""]
    if results:
        sections += ["## Schedules", "", *schedules(results, runs_dir),
                     "- the paper's (Sec. 4.2): 0.1, /10 at 32,000 and 48,000; 64,000 "
                     "iterations, batch 128; ResNet-110 at 0.01 until training error < 80% "
                     "(about 400 iterations)", ""]
    if kind == "table6":
        title = f"Table 6 (ResNets on {data})"
        if results:
            plot_fig6(results, runs_dir, out_dir / "curves.png", panels=(("ResNets", "ResNet"),))
        checked = ladder_claims(results, classes) or ["- not enough finished runs to compare yet"]
        sections += ["## The paper's claims on our numbers", "", *checked, "",
                     "![training (dashed) and test (bold) error](curves.png)", ""]
    elif kind == "fig6":
        title = f"Figure 6 (plain nets vs ResNets on {data})"
        if results:
            plot_fig6(results, runs_dir, out_dir / "fig6.png")
        checked = claims(results, runs_dir, classes) or [
            "- not enough finished runs to compare yet"]
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
            "| net | layers | mean std | median std | max std |", "|---|---|---|---|---|",
            *[f"| {k} | {len(v)} | {statistics.mean(v):.3f} | {statistics.median(v):.3f} | "
              f"{max(v):.3f} |" for k, v in responses.items()],
            "", "## The paper's claims on our numbers", "",
            *(response_claims(responses) or ["- not enough finished runs to compare yet"]),
            "", "![Figure 7](fig7.png)", "",
        ]
    write_outputs(out_dir, title, results, sections, data, command)
    return out_dir / "report.md"


# Sec. 4.1: (label, model, shortcut) of each ImageNet experiment's arms (docs/paper.md).
_FIG4 = [("plain-18", "plain18", None), ("plain-34", "plain34", None),
         ("ResNet-18", "resnet18", "A"), ("ResNet-34", "resnet34", "A")]
IMAGENET_ARMS: dict[str, list[tuple[str, str, str | None]]] = {
    "fig4": _FIG4, "table2": _FIG4,
    "table3": [("plain-34", "plain34", None), ("ResNet-34 A", "resnet34", "A"),
               ("ResNet-34 B", "resnet34", "B"), ("ResNet-34 C", "resnet34", "C"),
               ("ResNet-50", "resnet50", "B"), ("ResNet-101", "resnet101", "B"),
               ("ResNet-152", "resnet152", "B")],
    "table4": [("ResNet-34 B", "resnet34", "B"), ("ResNet-34 C", "resnet34", "C"),
               ("ResNet-50", "resnet50", "B"), ("ResNet-101", "resnet101", "B"),
               ("ResNet-152", "resnet152", "B")],
}
IMAGENET_PROTOCOL = {"fig4": "10-crop", "table2": "10-crop", "table3": "10-crop",
                     "table4": "multi-scale"}
# ImageNet validation error (%), top-1 and top-5 where the paper gives it (docs/paper.md).
IMAGENET_PAPER: dict[str, dict[str, tuple[float, float | None]]] = {
    "table2": {"plain-18": (27.94, None), "plain-34": (28.54, None), "ResNet-18": (27.88, None),
               "ResNet-34": (25.03, None)},
    "table3": {"plain-34": (28.54, 10.02), "ResNet-34 A": (25.03, 7.76),
               "ResNet-34 B": (24.52, 7.46), "ResNet-34 C": (24.19, 7.40),
               "ResNet-50": (22.85, 6.71), "ResNet-101": (21.75, 6.05),
               "ResNet-152": (21.43, 5.71)},
    "table4": {"ResNet-152": (19.38, 4.49)},
}
IMAGENET_PAPER["fig4"] = IMAGENET_PAPER["table2"]
KINDS = (*DEFAULT_DEPTHS, *IMAGENET_ARMS)


def imagenet_arms(kind: str, exp: Experiment, depths: Sequence[int] | None) -> list[Arm]:
    chosen = [a for a in IMAGENET_ARMS[kind] if not depths or model_depth(a[1]) in depths]
    if not chosen:
        valid = sorted({model_depth(m) for _, m, _ in IMAGENET_ARMS[kind]})
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


def _imagenet_table(kind: str, results: list[dict[str, Any]], protocol: str) -> list[str]:
    lines = [f"| net | params | iterations | final train error % | centre-crop val top-1 % | "
             f"{protocol} top-1 % | {protocol} top-5 % | paper top-1 % | paper top-5 % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in by_label(results).items():
        r = rs[0]
        paper = IMAGENET_PAPER[kind].get(label, (None, None))
        top1, top5 = (f"{protocol}_top1_error", f"{protocol}_top5_error")
        ours = [pct(r[k]) if r.get(k) is not None else "not evaluated" for k in (top1, top5)]
        if r.get(top1) is not None and r.get(top5) is None:
            ours[1] = "n/a (≤ 5 classes)"  # every label is in a top 5 of 5
        lines.append(
            f"| {label} | {r['params']:,} | {r['iterations']:,} | {pct(r['final_train_error'])} "
            f"| {pct(r['final_test_error'])} | {ours[0]} | {ours[1]} | "
            + " | ".join("—" if v is None else f"{v:.2f}" for v in paper) + " |")
    return lines


def _imagenet_claims(results: list[dict[str, Any]], protocol: str) -> list[str]:
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


def _reproduce_imagenet(kind: str, exp: Experiment, depths: Sequence[int] | None) -> Path:
    """`fig4`, `table2`, `table3` or `table4` on an image tree."""
    protocol = IMAGENET_PROTOCOL[kind]
    tree = None
    if not exp.report_only:
        tree = open_data(exp.data, loader="stream")
    arms = imagenet_arms(kind, exp, depths)
    t0 = time.time()
    results = run_arms(arms, exp, tree)
    if not exp.report_only:
        print(f"all runs finished or reused in {time.time() - t0:.0f} s")
    _protocol_errors(results, exp, tree, protocol)
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"## Errors ({protocol} testing; the paper's on ImageNet's 50k validation "
                "images)", "", *_imagenet_table(kind, results, protocol), ""]
    if pending := unfinished(arms, exp.runs):
        sections += ["## Runs not finished yet", "", *pending, ""]
    if kind in ("fig4", "table2"):
        if results:
            plot_fig6(results, exp.runs, exp.out_dir / "fig4.png",
                      panels=(("plain nets", "plain"), ("ResNets", "ResNet")))
        checked = _imagenet_claims(results, protocol) or [
            "- not enough finished runs to compare yet"]
        sections += ["## The paper's claims on our numbers", "", *checked, "",
                     "![Figure 4: dashed training error, bold centre-crop validation error]"
                     "(fig4.png)", ""]
    titles = {"fig4": "Figure 4", "table2": "Table 2", "table3": "Table 3", "table4": "Table 4"}
    command = exp.command("reproduce", kind, *(["--depths", *map(str, depths)] if depths else []))
    write_outputs(exp.out_dir, f"{titles[kind]} (ImageNet experiments on {exp.data})", results,
                  sections, exp.data, command)
    return exp.out_dir / "report.md"
