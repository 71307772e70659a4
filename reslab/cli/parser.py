"""`reslab`'s argparse parser, one function per group of commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from .inference import cmd_eval, cmd_export, cmd_predict
from .options import (
    DATA_HELP,
    PAPER,
    Parser,
    VersionAction,
    device_option,
    loading_options,
    model_options,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_options,
    study_options,
    worker_count,
)
from .run import cmd_train
from .tools import cmd_bench, cmd_data, cmd_info, cmd_reproduce


def build_parser() -> argparse.ArgumentParser:
    """reslab's parser: each option declared once, in its command's function below."""
    parser = Parser(
        prog="reslab",
        description="Deep Residual Learning for Image Recognition (He et al. 2016), exactly.",
    )
    parser.add_argument("--version", action=VersionAction,
                        help="reslab's, torch's and torchvision's versions and the JPEG decoder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_train, _add_inference, _add_tools):
        add(sub)
    return parser


def _add_info(sub: argparse._SubParsersAction) -> None:
    """`info`: a model's parameters, multiply-adds and stage sizes."""
    from .. import models

    p = sub.add_parser("info", help="parameters, multiply-adds and stage sizes of a model")
    p.add_argument("model", nargs="?",
                   help=f"one of {', '.join(models.list_models())} (or --all)")
    p.add_argument("--all", action="store_true",
                   help="every model of the paper, as a table (default: off)")
    p.add_argument("--pretrained", action="store_true",
                   help="reslab's released weights (name, data, iterations, test error); with "
                   "a released NAME as MODEL, its model card (default: off)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.add_argument("--input-size", type=positive_int,
                   help="input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets)")
    p.add_argument("--in-channels", type=positive_int, default=3,
                   help="input channels (default: 3)")
    p.add_argument("--num-classes", type=positive_int,
                   help="classifier outputs (default: 10 for CIFAR nets, 1000 for ImageNet nets)")
    model_options(p)
    p.set_defaults(func=cmd_info)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`train`: the run options once (run_options), the recipe's overrides."""
    p = sub.add_parser("train", help="train a model with the paper's recipe")
    p.add_argument("model", help="e.g. resnet20, plain56, resnet110 (reslab info --all lists all)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path,
                   help="run folder: created, or resumed if it holds this run unfinished "
                   "(required)")
    p.add_argument("--recipe", default="cifar10",
                   help="named recipe: cifar10 (Sec. 4.2), quick, imagenet (Sec. 3.4: lr "
                   "divided on plateaus), imagenet-step (÷10 at epochs 30 and 60 of 90) or "
                   "finetune (lr 0.01, 4,000 iterations; for --init-from) (default: cifar10)")
    p.add_argument("--augmentation", choices=("pad-crop-flip", "scale", "torchvision"),
                   help="pad-crop-flip (Sec. 4.2), scale (Sec. 3.4: shorter side in [256, 480], "
                   "224 crop, flip, PCA lighting) or torchvision (RandomResizedCrop) (default: "
                   "the recipe's)")
    p.add_argument("--accumulate", type=positive_int, metavar="K",
                   help="split each batch into K micro-batches, gradients summed: the paper's "
                   "batch on a small GPU, BN statistics per micro-batch (default: 1)")
    p.add_argument("--iterations", type=positive_int,
                   help=f"scale the schedule to N iterations, milestones with it (default: the "
                   f"recipe's; cifar10: {PAPER.iterations})")
    p.add_argument("--epochs", type=positive_float,
                   help="the same in epochs of the training set (default: the recipe's iterations)")
    p.add_argument("--milestones", type=positive_int, nargs="*", metavar="N",
                   help="iterations at which lr is divided by 10, after --iterations' scaling; to "
                   "extend a finished run, keep its milestones (default: the recipe's, scaled; "
                   f"cifar10: {' '.join(map(str, PAPER.milestones))})")
    p.add_argument("--lr", type=positive_float,
                   help=f"learning rate (default: the recipe's; cifar10: {PAPER.lr:g})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"mini-batch size (default: the recipe's; cifar10: {PAPER.batch_size})")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help=f"weight decay (default: the recipe's; cifar10: {PAPER.weight_decay:g})")
    p.add_argument("--warmup-min-depth", type=non_negative_int, metavar="N",
                   help="CIFAR-style nets of N layers or more start at lr "
                   f"{PAPER.warmup_lr:g} until training error is below "
                   f"{100 * PAPER.warmup_until_error:.0f}%%, as Sec. 4.2 does for ResNet-110; "
                   "0 warms up every net (default: the recipe's; cifar10: "
                   f"{PAPER.warmup_min_depth})")
    p.add_argument("--seed", type=non_negative_int,
                   help=f"initialisation and data order (default: the recipe's; {PAPER.seed})")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="auto is bf16 where the hardware runs it natively (default: auto)")
    p.add_argument("--eval-every", type=positive_int,
                   help="evaluate every K iterations; may change on resume (default: the "
                   f"recipe's; cifar10: {PAPER.eval_every})")
    p.add_argument("--log-every", type=non_negative_int,
                   help="log training error every K iterations; may change on resume (default: "
                   "0, 1%% of the run)")
    p.add_argument("--checkpoint-every", type=positive_int,
                   help="checkpoint every K iterations; may change on resume (default: the "
                   f"recipe's; cifar10: {PAPER.checkpoint_every})")
    p.add_argument("--val-split", type=non_negative_int,
                   help="hold out N training images for validation (default: 0)")
    p.add_argument("--normalization", choices=("pixel", "channel", "source"),
                   help="per-pixel mean (the paper's), per-channel mean/std, or source: the "
                   "--init-from weights' own, fitted to the data (default: the recipe's: "
                   "source for finetune, else pixel)")
    p.add_argument("--in-channels", type=positive_int,
                   help="input channels (default: the data's)")
    p.add_argument("--num-classes", type=positive_int,
                   help="classifier outputs (default: the data's classes)")
    p.add_argument("--zero-init-residual", action="store_true",
                   help="zero each block's last BN scale (not the paper's; default: off)")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from trained weights: a finished run folder, a reslab "
                   "model.safetensors, a released name (reslab info --pretrained), "
                   "torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1, from "
                   "torch.hub's cache) or a torchvision state dict (.pth, read without running "
                   "code); a classifier of another size is re-initialised (default: He init)")
    p.add_argument("--freeze", metavar="PARTS",
                   help="comma-separated parts kept fixed, BN statistics included: stem, "
                   "conv2_x, conv3_x, conv4_x (, conv5_x on ImageNet nets) (default: none)")
    p.add_argument("--linear-probe", action="store_true",
                   help="freeze everything but the classifier (fc) (default: off)")
    run_options(p)
    model_options(p)
    p.set_defaults(func=cmd_train)


def _add_inference(sub: argparse._SubParsersAction) -> None:
    """`eval`, `predict` and `export`: what a trained run gives."""
    p = sub.add_parser("eval", help="test error of a trained run, or of an ensemble of runs")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="finished run folder or its model.safetensors, a released name (reslab "
                   "info --pretrained) or torchvision:WEIGHTS; several: their ensemble (softmax "
                   "scores averaged, as the paper's Table 5), beside each member")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    device_option(p)
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="evaluate in this precision (default: the run's training precision)")
    p.add_argument("--protocol", choices=("centre", "10-crop", "multi-scale"),
                   help="testing protocol for a streamed image folder (Sec. 3.4): the centre "
                   "224 crop, 10 crops, or whole images at 5 scales (default: centre)")
    loading_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="the top-k classes of images, from a trained run (or an "
                       "ensemble of runs) or its exported .onnx")
    p.add_argument("run", type=Path, help="finished run folder, its model.safetensors, an .onnx "
                   "exported from one, a released name (reslab info --pretrained) or "
                   "torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched for images; run folders, weights "
                   "files or released names before them join RUN in an ensemble (softmax "
                   "scores averaged)")
    p.add_argument("--top-k", type=positive_int, default=5,
                   help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.add_argument("--protocol", choices=("centre", "10-crop", "multi-scale"), default="centre",
                   help="for runs trained on photographs: the centre 224 crop, 10 crops, or the "
                   "whole image at 5 scales (Sec. 3.4) (default: centre)")
    p.add_argument("--features", type=Path, metavar="OUT.npy",
                   help="also write each image's pooled feature vector (the classifier's input; "
                   "with 10-crop the mean of its views') to OUT.npy, its images in order in "
                   "OUT.txt (default: off)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (default: 64)")
    device_option(p)
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="(default: the run's training precision, as reslab eval)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a trained run as one file: ONNX or a torch.export program")
    p.add_argument("run", type=Path, help="finished run folder or its model.safetensors")
    p.add_argument("--format", required=True, choices=("onnx", "torch-export"),
                   help="onnx (for ONNX Runtime: uint8 (N, C, H, W) images in, the run's "
                   "normalisation and the BN-folded network inside) or torch-export (.pt2) "
                   "(required)")
    p.add_argument("--out", type=Path,
                   help="output file, never an existing one without --overwrite nor a run's "
                   "own (default: model.onnx or model.pt2 beside the weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (never the run's weights, metrics or "
                   "other own files) (default: off, an existing file is an error)")
    p.add_argument("--input-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="image size the export takes (default: the run's training size)")
    p.set_defaults(func=cmd_export)


def _add_tools(sub: argparse._SubParsersAction) -> None:
    """`data`, `reproduce`, `study`, `bench` and the `torchrun` listing."""
    p = sub.add_parser("data", help="check an image folder (decode every image, list the bad) or "
                       "time its loader against torchvision's")
    p.add_argument("action", choices=("check", "bench"), help="check or bench")
    p.add_argument("folder", type=Path, help="an ImageFolder tree (train/ and val/ or test/)")
    p.add_argument("--workers", type=worker_count,
                   help="decoding processes (default: one per core; bench: at most 8)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="bench: images per batch (default: 64)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("reproduce", help="the paper's experiments: CIFAR-10's Table 6, Figures 6 "
                       "and 7; ImageNet's Figure 4, Tables 2, 3 and 4")
    p.add_argument("experiment", choices=("table6", "fig6", "fig7", "fig4", "table2", "table3",
                                          "table4"),
                   help="table6, fig6, fig7 (CIFAR-style data in memory); fig4, table2, table3, "
                   "table4 (an image tree, streamed)")
    study_options(p, depths_help="the depths to train: CIFAR 6n+2, ImageNet 18 34 50 101 152 "
                   "(default: the paper's for the experiment)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("study", help="beyond the paper: block depth, shortcut mappings, "
                       "degradation in deep MLPs and LSTMs")
    p.add_argument("experiment", choices=("block-depth", "shortcuts", "mlp-depth", "rnn-depth"),
                   metavar="STUDY", help="block-depth, shortcuts, mlp-depth or rnn-depth")
    study_options(p, depths_help="total depths (default: 56; shortcuts: 56 20; mlp-depth: 4 8 "
                   "14 20 32 56; rnn-depth: 1 2 4 8 16)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="training or inference speed vs a plain reference")
    p.add_argument("mode", choices=("train", "infer", "onnx", "photos"),
                   help="train, infer (PyTorch's inference paths), onnx (the exported model on "
                   "ONNX Runtime against eager and reslab's best PyTorch path, batch 1 and 32), "
                   "or photos (training at 224 from an image folder, reslab's loader and step "
                   "against torchvision's loader and a plain loop)")
    p.add_argument("model", help="e.g. resnet20, resnet50")
    p.add_argument("--batch-size", type=positive_int,
                   help="(default: 128 train, 1 infer, 1 and 32 onnx, 32 photos)")
    p.add_argument("--threads", type=positive_int,
                   help="onnx: threads for PyTorch and ONNX Runtime (default: all cores)")
    p.add_argument("--steps", type=positive_int,
                   help="timed steps per setup, train and photos (default: 20)")
    p.add_argument("--input-size", type=positive_int,
                   help="input side in pixels (default: 32 for CIFAR nets, 224 for ImageNet nets)")
    p.add_argument("--in-channels", type=positive_int,
                   help="input channels, train and infer (default: 3)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out (default: compiled)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the one-change-at-a-time ablation (default: run it)")
    p.add_argument("--device", help="cpu or cuda, train and photos (default: cpu)")
    p.add_argument("--data", type=Path,
                   help="photos: the image folder (default: none; photos needs one)")
    p.add_argument("--workers", type=worker_count,
                   help="photos: loader processes (default: one per core, at most 8)")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: off)")
    p.set_defaults(func=cmd_bench)
    # Listed for --help only: main hands `reslab torchrun ...` to reslab.launch before parsing.
    sub.add_parser("torchrun", add_help=False,
                   help="torchrun [its options] COMMAND ...: torchrun -m reslab COMMAND, with "
                   "reslab's exit statuses and a bounded wait (reslab torchrun --help)")
