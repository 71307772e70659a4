"""The benchmarks, one per regime: `train` (in-memory training against the PyTorch CIFAR
tutorial's trainer in `reference`, with an ablation), `photos` (the streamed photograph path
against torchvision's loader) and `infer` (inference and ONNX Runtime). Nothing else in the
package imports them; `reslab bench` and `reslab data bench` call them."""
