"""reslab: Deep Residual Learning for Image Recognition (He et al., CVPR 2016), exactly.

The public API is imported on first use, so `import reslab.cli` (the `reslab` command) costs
nothing until a command needs torch: `reslab --version` is instant, and Ctrl-C while torch loads
is handled by the command, not a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbone import StageBackbone
    from .models import build_model, list_models
    from .predict import open_predictor
    from .pretrained import list_pretrained, load_pretrained
    from .trained import Trained, load_trained

__all__ = ["StageBackbone", "Trained", "build_model", "list_models", "list_pretrained",
           "load_pretrained", "load_trained", "open_predictor", "train"]
__version__ = "0.1.0"
_HOMES = {"build_model": "models", "list_models": "models", "Trained": "trained",
          "load_trained": "trained", "StageBackbone": "backbone", "open_predictor": "predict",
          "load_pretrained": "pretrained", "list_pretrained": "pretrained"}


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name == "train":  # reslab.train(model, *, data, out, **options): the module, callable
        return import_module(".train", __name__)
    if name not in _HOMES:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
