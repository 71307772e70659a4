"""Ensembles of trained runs, as the paper's ILSVRC 2015 entry (Sec. 3.4, Table 5: "we combine
six models of different depth"): the members' softmax scores averaged.

An Ensemble is a module like any trained net, so every evaluation path, every test protocol and
predict take it unchanged: its output is the log of the members' mean probability, so a softmax
of it is that mean, its argmax the ensemble's class and the cross-entropy on it the ensemble's
loss. A one-member ensemble is that member, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .trained import Trained


class EnsembleError(ValueError):
    """Members that cannot be averaged: other classes, inputs or normalisation."""


def combine(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's output from its members' logits: log(mean_i softmax(z_i)), computed stably
    as the logsumexp of the log-probabilities minus log(n); one member's logits unchanged."""
    if len(logits) == 1:
        return logits[0]
    logp = torch.stack([torch.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[nn.Module], precisions: Sequence[str]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.precisions = tuple(precisions)  # each member in its own (training) precision

    @property
    def fc(self) -> nn.Linear:
        """The first member's classifier: the outputs' count, as a single net's (checked equal)."""
        return self.members[0].fc

    @property
    def in_channels(self) -> int:
        return self.members[0].in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise EnsembleError("features are one net's: give a single run with --features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine([self._member(i, x) for i in range(len(self.members))])

    def _member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=self.precisions[i] == "bf16"):
            return self.members[i](x)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def check_members(members: Sequence[Trained], names: Sequence[str]) -> None:
    """Members agree on what the ensemble's inputs and outputs mean, or an EnsembleError names
    the first that does not and why."""
    first, name0 = members[0], names[0]
    for m, name in zip(members[1:], names[1:], strict=True):
        problem = None
        if m.model.fc.out_features != first.model.fc.out_features:
            problem = (f"{m.model.fc.out_features} outputs, {name0} has "
                       f"{first.model.fc.out_features}")
        elif None not in (m.classes, first.classes) and m.classes != first.classes:
            problem = "other class names (or another order) than " + name0
        elif m.model.in_channels != first.model.in_channels:
            problem = f"{m.model.in_channels}-channel inputs, {name0} {first.model.in_channels}"
        elif None not in (m.input_size, first.input_size) and m.input_size != first.input_size:
            problem = (f"{m.input_size[0]}x{m.input_size[1]} inputs, {name0} "
                       f"{first.input_size[0]}x{first.input_size[1]}")
        elif not (_same(m.mean, first.mean) and _same(m.std, first.std)):
            problem = (f"another input normalisation than {name0} (other training data, "
                       "--val-split or --normalization)")
        elif (m.spec.recipe.augmentation == "pad-crop-flip") != \
                (first.spec.recipe.augmentation == "pad-crop-flip"):
            problem = f"another image regime than {name0} (photographs vs small images)"
        if problem:
            raise EnsembleError(f"cannot ensemble {name}: it has {problem}; ensemble runs "
                                "trained on the same data")


def ensemble(members: Sequence[Trained], names: Sequence[str | Path],
             precision: str | None = None) -> Trained:
    """One Trained whose model averages the members' softmax scores (in `precision`, else each
    member's training precision), fed as the first member is."""
    names = [str(n) for n in names]
    if not members:
        raise EnsembleError("an ensemble needs at least one run")
    check_members(members, names)
    first = members[0]
    model = Ensemble([m.model for m in members],
                     [precision or m.spec.recipe.precision for m in members])
    classes = next((m.classes for m in members if m.classes is not None), None)
    size = next((m.input_size for m in members if m.input_size is not None), None)
    return Trained(model.eval(), first.mean, first.std, first.spec, classes, size)
