"""`reslab eval`, `predict` and `export`: a trained run (or a released name, or an ensemble)
on data, on images, as one file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from .options import UsageError
from .run import report_left_out


def cmd_eval(args: argparse.Namespace) -> int:
    """Test error of one run, or of an ensemble of runs (their softmax scores averaged, Table 5)
    beside each member's."""
    from ..data import open_data
    from ..ensemble import EnsembleError, combine, ensemble
    from ..pretrained import load_source

    members = [load_source(run, device=args.device) for run in args.runs]
    data = open_data(args.data, skip_bad_images=args.skip_bad_images, loader=args.loader)
    report_left_out(data)
    for run, trained in zip(args.runs, members, strict=True):
        _check_eval_data(args, run, trained, data)
    if len(members) == 1:
        record, label = _eval_one(args, members[0], data), members[0].spec.model
    else:
        try:
            joint = ensemble(members, args.runs, precision=args.precision)
        except EnsembleError as e:
            raise UsageError(str(e)) from None
        # Held test images: each member's logits once, the ensemble's from them (combine);
        # streamed ones (no logits): each protocol's views, every member, then the joint.
        logits = [data.test_logits(t.model, t.mean, t.std, precision=_precision(args, t))
                  for t in members]
        if any(z is None for z in logits):
            records = [_eval_one(args, trained, data) for trained in members]
            record = _eval_one(args, joint, data)
        else:
            records = [_eval_one(args, t, data, logits=z) for t, z in zip(members, logits,
                                                                         strict=True)]
            record = _eval_one(args, joint, data, logits=combine(logits))
        record = {**record, "model": [t.spec.model for t in members],
                  "members": [{"run": str(run), **r} for run, r in zip(args.runs, records,
                                                                       strict=True)]}
        label = f"ensemble of {len(members)}"
        if not args.json:
            for run, r in zip(args.runs, records, strict=True):
                print(f"  member {run}: {_error_line(r)}")
    if args.json:
        print(json.dumps({**record, "data": args.data}))
    else:
        print(f"{label} on {args.data} ({record['protocol']}): {_error_line(record)}")
    return 0


def _check_eval_data(args: argparse.Namespace, run: Path, trained, data) -> None:  # noqa: ANN001
    """The data fits the run (trained.check_fits); --protocol only where the data has one."""
    from ..trained import check_fits

    check_fits(trained, data, run=str(run), data_name=args.data)
    if args.protocol is not None and args.protocol not in data.protocols:
        raise UsageError(f"--protocol {args.protocol} is for photographs streamed from an image "
                         f"folder; {args.data} is held in memory and tested on its single view "
                         "(Sec. 4.2)")


def _precision(args: argparse.Namespace, trained) -> str:  # noqa: ANN001
    """--precision, else an ensemble in fp32 (each member in its own) and a run in its own."""
    if args.precision:
        return args.precision
    return "fp32" if hasattr(trained.model, "members") else trained.spec.recipe.precision


def _eval_one(args: argparse.Namespace, trained, data, *, logits=None) -> dict:  # noqa: ANN001
    """One record of `trained` on `data` (from `logits` where given): the same keys for every
    data source."""
    r = data.evaluate(trained.model, trained.mean, trained.std, protocol=args.protocol,
                      precision=_precision(args, trained), workers=args.workers,
                      skip_bad_images=args.skip_bad_images, logits=logits)
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} bad image(s) (--skip-bad-images): "
              + "; ".join(r["skipped"][:3]), file=sys.stderr)
    return _record(trained.spec.model, args.precision or trained.spec.recipe.precision,
                   r["test_error"], r["test_top5_error"], r["test_loss"], r["protocol"],
                   r["images"], len(r["skipped"]))


def _record(model: str, precision: str, error: float, top5: float | None, loss: float,
            protocol: str, images: int, skipped: int) -> dict:
    """`reslab eval`'s record, the same keys for every data source (the names metrics.jsonl
    uses): test_error is the top-1 error; test_top5_error None for 5 classes or fewer."""
    return {"test_error": error, "test_top5_error": top5, "test_loss": loss,
            "protocol": protocol, "images": images, "skipped": skipped, "model": model,
            "precision": precision}


def _error_line(r: dict) -> str:
    top5 = "n/a (5 classes or fewer)" if r["test_top5_error"] is None else \
        f"{100 * r['test_top5_error']:.2f}%"
    return (f"test error {100 * r['test_error']:.2f}%, top-5 error {top5}, test loss "
            f"{r['test_loss']:.4f} ({r['images']} images, {r['precision']})")


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image; exit 2 (a user's error) if any image could not be predicted,
    each named in one line (the others are still predicted)."""
    import numpy as np

    from ..ensemble import EnsembleError
    from ..predict import (
        Prediction,
        class_name,
        is_model_source,
        list_images,
        open_predictor,
        predict,
    )

    if args.features is not None and args.features.with_suffix(".txt") == args.features:
        raise UsageError(f"--features {args.features}: its images are listed in "
                         f"{args.features}; give the features a name ending .npy")
    # RUN RUN ... IMAGES: the leading arguments that name models make an ensemble.
    runs, images = [args.run], list(args.images)
    while len(images) > 1 and is_model_source(images[0]):
        runs.append(images.pop(0))
    if len(runs) > 1 and args.features is not None:
        raise UsageError("--features are one net's: give a single run with --features")
    try:
        predictor = open_predictor(runs, device=args.device, precision=args.precision)
    except EnsembleError as e:
        raise UsageError(str(e)) from None
    files = list_images(images)
    done: list[Prediction] = []
    failed: list[tuple[str, str]] = []
    for result in predict(predictor, files, top_k=args.top_k, protocol=args.protocol,
                          batch_size=args.batch_size, features=args.features is not None):
        if isinstance(result, Prediction):
            done.append(result)
            if not args.json:
                print(f"{result.path}  " + "  ".join(
                    f"{class_name(predictor, i)} ({100 * p:.1f}%)" for i, p in result.top))
        else:
            failed.append(result)
            print(f"reslab predict: error: {result[1]}", file=sys.stderr)
    # Images in folders named after the model's classes (a test/ split): their top-1 error.
    labelled = [(r, Path(r.path).parent.name) for r in done]
    known = predictor.classes is not None and bool(labelled) and all(
        name in predictor.classes for _, name in labelled)
    error = None
    if known:
        error = sum(class_name(predictor, r.top[0][0]) != name for r, name in labelled) / len(done)
    if args.features is not None and done:
        with open(args.features, "wb") as f:  # the name given: np.save(name) would add .npy
            np.save(f, np.stack([r.features for r in done]).astype(np.float32))
        rows = Path(args.features).with_suffix(".txt")
        rows.write_text("".join(f"{r.path}\n" for r in done))
        print(f"features ({len(done)} x {done[0].features.shape[0]}) in {args.features}, their "
              f"images in order in {rows}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "model": str(args.run) if len(runs) == 1 else [str(r) for r in runs],
            "protocol": args.protocol,
            "predictions": [{"path": r.path, "top": [
                {"class": class_name(predictor, i), "index": i, "probability": p}
                for i, p in r.top]} for r in done],
            "failed": [{"path": path, "error": message} for path, message in failed],
            **({"top1_error": error} if error is not None else {}),
        }))
    elif done:  # with nothing predicted, the failures' lines say it all
        tail = f"; {len(failed)} could not be read" if failed else ""
        where = (f"; top-1 error {100 * error:.2f}% (their folders name their classes)"
                 if error is not None else "")
        print(f"{len(done)} image(s) predicted{tail}{where}", file=sys.stderr)
    return 2 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_run

    path = export_run(args.run, args.format, args.out, overwrite=args.overwrite,
                      input_size=None if args.input_size is None else tuple(args.input_size))
    print(f"wrote {path}")
    return 0
