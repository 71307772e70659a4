"""Beyond the paper's CNNs: does degradation appear in deep plain MLPs and LSTM stacks, and do
identity shortcuts remove it? (mlp_rnn.py has the nets.)

The paper's evidence (Sec. 4.1-4.2, Fig. 4 and 6) is that a deeper plain net reaches a higher
*training* error than a shallower one, and that the residual twin of the deeper net does not.
Each study trains both twins at each depth over seeds into experiments.py's run pool, then
reports final training and test error against depth, mean ± std over seeds, with a plot and the
two claims read off the numbers:

- mlp-depth: fully connected nets of width 128 on the paper's SGD recipe (no augmentation).
- rnn-depth: LSTM stacks of 64 units reading images row by row, on Adam with clipping (the
  usual optimiser of deep LSTMs; recipes.py "rnn"), the same for both arms.

A one-layer LSTM has no shortcut to add (its input is narrower), so plain and residual are one
net there, trained once and drawn in both lines.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .data import load_dataset
from .experiments import Arm, Experiment, pct, run_arms, unfinished, write_outputs
from .runtime import require
from .train import RunSpec


@dataclass(frozen=True)
class DepthStudy:
    kind: str  # "mlp" | "lstm": the nets res{kind}N and plain{kind}N
    depths: tuple[int, ...]
    recipe: str  # recipes.RECIPES' name
    iterations: int  # the default schedule (sized to ~1-2 h of a 2-core CPU for three seeds)
    what: str


DEPTH_STUDIES = {
    "mlp-depth": DepthStudy("mlp", (4, 8, 14, 20, 32, 56), "mlp", 3_000,
                            "fully connected nets (width 128, BN, blocks of two layers)"),
    "rnn-depth": DepthStudy("lstm", (1, 2, 4, 8, 16), "rnn", 1_500,
                            "stacked LSTMs (64 units) reading the image row by row"),
}
ARMS = ("plain", "residual")
CHANCE_FRACTION = 0.8  # a mean error above 80% of chance's is "near chance"


def depth_arms(study: DepthStudy, exp: Experiment, depths: Sequence[int]) -> list[Arm]:
    arms = []
    for seed in range(exp.seeds):
        recipe = exp.recipe(seed, base=study.recipe)
        every = max(1, recipe.iterations // 10)  # ten evaluations: the test set costs an LSTM
        recipe = replace(recipe, eval_every=every, checkpoint_every=every)
        for depth in depths:
            for arm in ARMS:
                if arm == "residual" and study.kind == "lstm" and depth == 1:
                    continue  # one net: drawn in both lines
                model = f"{'res' if arm == 'residual' else 'plain'}{study.kind}{depth}"
                label = f"{study.kind}-{depth}" + ("" if study.kind == "lstm" and depth == 1
                                                   else f" {arm}")
                arms.append(Arm(label, RunSpec(model=model, data=exp.data, recipe=recipe)))
    return arms


def by_depth(results: Sequence[dict[str, Any]], arm: str, key: str) -> dict[int, list[float]]:
    """{depth: [final `key` of each seed]} for one arm (a shared one-layer net counts in both)."""
    out: dict[int, list[float]] = {}
    for r in results:
        shared = " " not in r["label"]
        if shared or r["label"].endswith(arm):
            out.setdefault(r["depth"], []).append(r[key])
    return dict(sorted(out.items()))


def mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return pct(values[0])
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values))}"


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def claims(results: Sequence[dict[str, Any]], num_classes: int) -> list[str]:
    """The two claims, each "holds", "does not hold" or "too short to judge"."""
    train = {arm: by_depth(results, arm, "final_train_error") for arm in ARMS}
    test = {arm: by_depth(results, arm, "final_test_error") for arm in ARMS}
    depths = sorted(set(train["plain"]) & set(train["residual"]))
    if len(depths) < 2:
        return ["- Not measured yet: both arms need two or more finished depths."]
    chance = 1 - 1 / num_classes
    near = [d for d in depths for arm in ARMS
            if statistics.mean(test[arm][d]) > CHANCE_FRACTION * chance]
    if len(near) == 2 * len(depths):
        return [f"- Too short to judge: every arm's test error is near chance "
                f"({100 * chance:.0f}%); train longer (--iterations)."]

    def worst_gap(arm: str) -> tuple[int, int, float, bool]:
        """The largest rise of mean training error from a shallower depth to a deeper one,
        and whether it exceeds the two depths' seed spreads added."""
        best = (depths[0], depths[0], 0.0, False)
        for i, shallow in enumerate(depths):
            for deep in depths[i + 1:]:
                a, b = train[arm][shallow], train[arm][deep]
                gap = statistics.mean(b) - statistics.mean(a)
                if gap > best[2]:
                    best = (shallow, deep, gap, gap > _spread(a) + _spread(b))
        return best

    lines = []
    for arm, claim in (("plain", "1. Degradation: the plain stack's training error rises with "
                        "depth"),
                       ("residual", "2. The shortcuts remove it: the residual stack's training "
                        "error does not rise with depth")):
        shallow, deep, gap, real = worst_gap(arm)
        holds = real if arm == "plain" else not real
        if gap <= 0:
            seen = "it never rises: each deeper depth trains at least as low as every shallower one"
        else:
            seen = (f"largest rise {100 * gap:.2f} points, depth {shallow} "
                    f"({mean_std(train[arm][shallow])}%) to {deep} "
                    f"({mean_std(train[arm][deep])}%), "
                    + ("beyond" if real else "within") + " the two depths' seed std added")
        lines.append(f"- {claim}: **{'holds' if holds else 'does not hold'}** ({seen}).")
    deepest = depths[-1]
    p, r = train["plain"][deepest], train["residual"][deepest]
    lower = statistics.mean(r) < statistics.mean(p)
    lines.append(f"- 3. At the deepest depth ({deepest}) the residual stack trains "
                 f"{'lower' if lower else 'no lower'} than its plain twin: {mean_std(r)}% against "
                 f"{mean_std(p)}% (test {mean_std(test['residual'][deepest])}% against "
                 f"{mean_std(test['plain'][deepest])}%).")
    if near:
        lines.append(f"- Note: test error near chance for {len(near)} arm-depths "
                     f"(depths {', '.join(map(str, sorted(set(near))))}).")
    return lines


def depth_table(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| depth | plain: train error % | residual: train error % | plain: test error % | "
             "residual: test error % | params | seeds |", "|---|---|---|---|---|---|---|"]
    train = {arm: by_depth(results, arm, "final_train_error") for arm in ARMS}
    test = {arm: by_depth(results, arm, "final_test_error") for arm in ARMS}
    params = {r["depth"]: r["params"] for r in results}
    for d in sorted(params):
        cells = [mean_std(table[arm][d]) if d in table[arm] else "not finished"
                 for table in (train, test) for arm in ARMS]
        seeds = max(len(train[arm].get(d, [])) for arm in ARMS)
        lines.append(f"| {d} | {' | '.join(cells)} | {params[d]:,} | {seeds} |")
    return lines


def plot_depth(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Final training error (left) and test error (right) against depth, plain vs residual,
    mean with ± std bars over seeds."""
    matplotlib = require("matplotlib", "the report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(axes, ("final_train_error", "final_test_error"),
                             ("training error", "test error"), strict=True):
        for arm, style in zip(ARMS, ("o--", "s-"), strict=True):
            table = by_depth(results, arm, key)
            if not table:
                continue
            ds = list(table)
            ax.errorbar(ds, [100 * statistics.mean(v) for v in table.values()],
                        yerr=[100 * _spread(v) for v in table.values()], fmt=style, capsize=3,
                        label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (weighted layers)" if "mlp" in title else "depth (LSTM layers)")
        ax.set_ylabel(f"final {name} (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_depth_study(name: str, exp: Experiment, depths: Sequence[int] | None = None) -> Path:
    """Run mlp-depth or rnn-depth; write DIR/report.md, DIR/summary.json and DIR/depth.png."""
    study = DEPTH_STUDIES[name]
    depths = tuple(depths or study.depths)
    dataset = load_dataset(exp.data, skip_bad_images=exp.options.skip_bad_images)
    arms = depth_arms(study, exp, depths)
    results = run_arms(arms, exp, dataset)
    pending = unfinished(arms, exp.runs)
    r0 = arms[0].spec.recipe
    optimiser = ("Adam" if r0.optimizer == "adam" else "SGD with momentum") + f", lr {r0.lr:g}"
    sections = [
        f"{study.what}; {r0.iterations:,} iterations of batch {r0.batch_size} ({optimiser}, "
        f"divided by 10 at {' and '.join(f'{m:,}' for m in r0.milestones)}"
        + (f", gradient norm clipped at {r0.grad_clip:g}" if r0.grad_clip else "")
        + f", {r0.precision}, no augmentation). Mean ± std over seeds; the training error is "
        "that of the last 1% of the run's batches.", "",
        "## Final errors against depth", "", *depth_table(results), "",
        *(["## Runs not finished yet", "", *pending, ""] if pending else []),
        "## The claims, read off the numbers", "",
        *claims(results, dataset.num_classes), "",
    ]
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Study: {name} on {exp.data}"
    if results:
        plot_depth(results, exp.out_dir / "depth.png", title)
        sections += ["![final errors against depth](depth.png)", ""]
    write_outputs(exp.out_dir, title, results, sections, exp.data, exp.command("study", name))
    return exp.out_dir / "report.md"
