"""Where and how a run executes, none of which changes what it computes: the device and the
precision it resolves to, deterministic algorithms, cuDNN's autotuner, and the stop signals.
Each set-up is a context manager that restores what it changed, so a second run in the same
process (a study, a test) starts from the same global state as the first."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: str) -> torch.device:
    """"auto" is the first GPU if there is one, else the CPU; any other name must exist on this
    machine (ValueError naming it and what there is, before any work is done)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use auto, cpu, cuda or "
                         "cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device; use --device "
                             "cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {device}: no {dev.type} device on this machine; use --device "
                         "cpu (or auto)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware runs it natively (measured ~1.9x fp32 on AVX-512 bf16)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def algorithms(device: torch.device, deterministic: bool) -> Iterator[None]:
    """deterministic: only deterministic algorithms (two runs write identical metrics);
    otherwise on a GPU cuDNN's autotuner picks each convolution's fastest (the shapes are
    fixed). Restores the three global settings it touches."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if device.type == "cuda" and not deterministic:
            torch.backends.cudnn.benchmark = True
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[2]


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGINT are noted, not acted on: the loop finishes its step, saves and stops.
    Yields the list the signals are appended to; the old handlers come back on exit."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# channels_last: faster fp32 convolutions on CPU (oneDNN) and tensor cores on GPU.
MEMORY_FORMAT = torch.channels_last


def autocast(device: torch.device, precision: str, *, cache: bool = True):
    """bf16 autocast on CPU or CUDA, or nothing for fp32. `cache=False` for CUDA graph capture."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


# The optional parts and the extra (pyproject.toml) that brings each: `pip install .` trains and
# evaluates without them; `make` and `reslab[dev]` install them all.
EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export",
          "tensorboard": "tensorboard", "matplotlib": "plots"}


class MissingExtra(ValueError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, what: str):  # noqa: ANN201 (the module)
    """Import an optional dependency for `what`, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"{what} needs {top}, which is optional: pip install "
                           f"'reslab[{EXTRAS[top]}]' (or 'reslab[dev]' for every extra)") from None
