"""Training recipes: frozen dataclasses with the paper's defaults; variants are `replace`d."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Recipe:
    """Sec. 4.2's CIFAR-10 recipe, in iterations (the paper's unit).

    SGD with momentum 0.9 and weight decay 1e-4 on mini-batches of 128; lr 0.1, divided by 10 at
    32k and 48k iterations, stop at 64k. Nets of depth >= 110 warm up at lr 0.01 until the
    training error falls below 80% (a condition, not a count; about 400 iterations in the
    paper), then go back to 0.1.
    """

    name: str = "cifar10"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    iterations: int = 64_000
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr_decay: float = 0.1
    warmup_lr: float = 0.01
    warmup_min_depth: int = 110  # the paper warms up ResNet-110 (and 1202 "as described above")
    warmup_until_error: float = 0.80
    warmup_window: int = 20  # iterations whose mean training error is tested against 80%
    pad: int = 4  # Sec. 4.2: pad 4, random crop, horizontal flip
    # "pad-crop-flip" (Sec. 4.2, in-memory images), "scale" (Sec. 3.4: shorter side in
    # [256, 480], 224 crop, flip, PCA lighting) or "torchvision" (RandomResizedCrop, flip).
    augmentation: str = "pad-crop-flip"
    # "milestones": lr divided at fixed iterations; "plateau" (Sec. 3.4): divided when the
    # evaluated error has not improved for `plateau_patience` evaluations in a row.
    lr_policy: str = "milestones"
    plateau_patience: int = 3
    accumulate: int = 1  # micro-batches per step (batch_size / accumulate each; BN per micro-batch)
    # "pixel": per-pixel mean (the paper's); "channel": mean/std; "source": a fine-tune's source
    # weights' own (finetune.fit_to_data), else the per-pixel mean.
    normalization: str = "pixel"
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16", "fp32"
    # "sgd" (the paper's, with momentum and weight decay) or "adam" (Kingma & Ba; the usual
    # optimiser of deep LSTMs, mlp_rnn.py: momentum is then unused, weight decay is Adam's L2).
    optimizer: str = "sgd"
    grad_clip: float = 0.0  # > 0: clip the gradients' global L2 norm to this (LSTMs); 0: off
    seed: int = 0
    val_split: int = 0  # hold out this many training images (the paper chose its schedule 45k/5k)
    eval_every: int = 1_000
    log_every: int = 0  # 0: every ~1% of the run (smooth Fig. 6 curves)
    checkpoint_every: int = 1_000

    def __post_init__(self) -> None:
        problems = []
        for name in ("lr", "momentum", "weight_decay", "lr_decay", "warmup_lr",
                     "warmup_until_error"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name.replace('_', '-')} must be a finite number (got "
                                f"{getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1 (got {self.iterations})")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1) (got {self.momentum})")
        if list(self.milestones) != sorted(self.milestones) or any(
                m < 1 for m in self.milestones):
            problems.append(f"milestones must be positive and increase (got "
                            f"{' '.join(map(str, self.milestones))})")
        if self.normalization not in ("pixel", "channel", "source"):
            problems.append(f"normalization must be 'pixel', 'channel' or 'source' (got "
                            f"{self.normalization!r})")
        if self.augmentation not in ("pad-crop-flip", "scale", "torchvision"):
            problems.append(f"augmentation must be pad-crop-flip, scale or torchvision (got "
                            f"{self.augmentation!r})")
        if self.lr_policy not in ("milestones", "plateau"):
            problems.append(f"lr_policy must be milestones or plateau (got {self.lr_policy!r})")
        if self.plateau_patience < 1:
            problems.append(f"plateau patience must be >= 1 (got {self.plateau_patience})")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            problems.append(f"--accumulate {self.accumulate} must divide the batch size "
                            f"{self.batch_size} (micro-batches of equal size)")
        if self.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer must be sgd or adam (got {self.optimizer!r})")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            problems.append(f"grad-clip must be a finite number >= 0 (got {self.grad_clip})")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32 (got {self.precision!r})")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                problems.append(f"{flag} must be >= 1 (got {getattr(self, name)})")
        if self.log_every < 0 or self.val_split < 0 or self.pad < 0:
            problems.append("log-every, val-split and pad must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def with_iterations(self, iterations: int) -> Recipe:
        """A shorter (or longer) run: the milestones scale with the iterations
        (docs/design.md, principle 2)."""
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1 (got {iterations}); e.g. --iterations 8000")
        scale = iterations / self.iterations
        return replace(
            self, iterations=iterations,
            # At least 1: a very short run (--iterations 1) would otherwise round one to 0.
            milestones=tuple(max(1, round(m * scale)) for m in self.milestones),
        )

    def with_epochs(self, epochs: float, train_size: int) -> Recipe:
        """The same in epochs over `train_size` images."""
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0 (got {epochs})")
        return self.with_iterations(math.ceil(epochs * train_size / self.batch_size))

    @property
    def log_interval(self) -> int:
        return self.log_every or max(1, self.iterations // 100)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)


def learning_rate(recipe: Recipe, step: int, warming_up: bool = False,
                  divisions: int = 0) -> float:
    """lr for iteration `step` (0-based): divided by 10 at each milestone passed, or with the
    plateau policy `divisions` times (Plateau); during the warm-up of very deep nets, at most
    recipe.warmup_lr."""
    if recipe.lr_policy == "plateau":
        lr = recipe.lr * recipe.lr_decay ** divisions
    else:
        lr = recipe.lr * recipe.lr_decay ** sum(step >= m for m in recipe.milestones)
    return min(lr, recipe.warmup_lr) if warming_up else lr


class Plateau:
    """Sec. 3.4's "divided by 10 when the error plateaus": after `patience` evaluations in a
    row without a new best error (by more than 0.01%, relative), one more division. The paper
    gives no count; 3 evaluations (3 epochs at one evaluation per epoch) is this reading. Its
    state is checkpointed."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.stale, self.divisions = patience, float("inf"), 0, 0

    def update(self, error: float) -> bool:
        """Note an evaluation; True if the lr is divided now."""
        if error < self.best * (1 - 1e-4):
            self.best, self.stale = error, 0
            return False
        self.stale += 1
        if self.stale < self.patience:
            return False
        self.divisions, self.stale = self.divisions + 1, 0
        return True

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "stale": self.stale, "divisions": self.divisions}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.best, self.stale = float(state["best"]), int(state["stale"])
        self.divisions = int(state["divisions"])


RECIPES: dict[str, Recipe] = {
    "cifar10": Recipe(),
    # The main job of `make run`: the paper's recipe scaled to 4,500 iterations (~10 epochs of
    # Fashion-MNIST, ~8 minutes on 2 CPU cores). 3,000 iterations ended at 9.11% test error.
    "quick": replace(Recipe(name="quick").with_iterations(4_500), eval_every=500,
                     checkpoint_every=500),
    # Sec. 3.4: batch 256, lr 0.1 divided by 10 when the error plateaus, up to 60e4 iterations,
    # weight decay 1e-4, momentum 0.9, no dropout; scale augmentation and lighting. Evaluated
    # (and the plateau tested) once an epoch of ImageNet's 1,281,167 images.
    "imagenet": Recipe(name="imagenet", batch_size=256, iterations=600_000, milestones=(),
                       lr_policy="plateau", augmentation="scale", pad=0, eval_every=5_005,
                       checkpoint_every=1_000),
    # The predictable variant (torchvision's reference, fb.resnet.torch): 90 epochs, lr divided
    # at epochs 30 and 60; --epochs N scales both milestones with it.
    "imagenet-step": Recipe(name="imagenet-step", batch_size=256, iterations=450_360,
                            milestones=(150_120, 300_240), augmentation="scale", pad=0,
                            eval_every=5_005, checkpoint_every=1_000),
    # Fine-tuning from trained weights (--init-from): a tenth of the paper's lr (the weights are
    # already where a from-scratch run ends its first stage) and a short schedule, 4,000
    # iterations (~10 epochs of 50k images at 128) divided at half and three quarters. Inputs
    # normalised as the source weights were trained (finetune.fit_to_data).
    "finetune": Recipe(name="finetune", lr=0.01, iterations=4_000, milestones=(2_000, 3_000),
                       normalization="source", eval_every=500, checkpoint_every=500),
    # The fully connected twins (mlp_rnn.py): the paper's SGD recipe without augmentation (the
    # degradation claim is about training error), in fp32 so that any CPU resumes a run.
    "mlp": Recipe(name="mlp", pad=0, precision="fp32"),
    # The LSTM twins: Adam at 1e-3 with the gradient norm clipped at 1, the usual recipe of deep
    # LSTMs (SGD at the paper's lr 0.1 diverges on them), divided by 10 at half and three
    # quarters as the paper's schedule; no augmentation; fp32.
    "rnn": Recipe(name="rnn", optimizer="adam", lr=1e-3, weight_decay=0.0, grad_clip=1.0,
                  pad=0, precision="fp32"),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}") from None
