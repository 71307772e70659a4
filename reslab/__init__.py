"""reslab: Deep Residual Learning for Image Recognition (He et al., CVPR 2016), exactly."""

from .models import build_model, list_models
from .train import load_trained

__all__ = ["build_model", "list_models", "load_trained"]
__version__ = "0.1.0"
