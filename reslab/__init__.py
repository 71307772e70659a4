"""reslab: Deep Residual Learning for Image Recognition (He et al., CVPR 2016), exactly."""

from .models import build_model, list_models

__all__ = ["build_model", "list_models"]
__version__ = "0.1.0"
