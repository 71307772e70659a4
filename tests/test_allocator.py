"""allocator.keep_freed_memory: no page faults for recycled activations, results unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, write_image_folder
from reslab import allocator

GLIBC = allocator.is_glibc()

# Three 8 MiB blocks made, written and freed in a loop, as a step's activations are (torch's CPU
# tensors come from the same malloc): glibc's defaults give the freed heap top (24 MiB, above its
# 16 MiB dynamic trim threshold) back to the kernel each time, so every pass faults its pages in.
CYCLE = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from reslab.allocator import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
def cycle():
    blocks = [libc.malloc(8 * 2**20) for _ in range(3)]
    for b in blocks:
        libc.memset(b, 1, 8 * 2**20)
    for b in blocks:
        libc.free(b)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _env_without_malloc_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_not_faulted_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CYCLE, mode], capture_output=True,
                             text=True, check=True, env=_env_without_malloc_settings())
        return int(out.stdout.split()[-1])

    pages = 5 * 3 * 8 * 2**20 // 4096  # what five passes touch
    assert faults("default") > pages // 2  # the control: glibc's defaults do fault
    assert faults("keep") < pages // 50


def test_users_malloc_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
    assert allocator.kept() is False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_training_is_bitwise_the_same_either_way(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=64, size=16))
    args = ["resnet8", "--data", str(folder), "--iterations", "30", "--batch-size", "16",
            "--eval-every", "15", "--log-every", "5", "--deterministic", "--no-progress"]
    base = dict(_env_without_malloc_settings(), OMP_NUM_THREADS="1")
    # A user's own threshold (glibc's static default) makes reslab leave malloc alone.
    for name, env in (("kept", base), ("glibc", dict(base, MALLOC_MMAP_THRESHOLD_="131072"))):
        subprocess.run([sys.executable, "-m", "reslab", "train", *args, "--out",
                        str(tmp_path / name)], env=env, check=True, capture_output=True)
    envs = {n: json.loads((tmp_path / n / "env.json").read_text()) for n in ("kept", "glibc")}
    assert envs["kept"]["malloc_keeps_freed_memory"] is True
    assert envs["glibc"]["malloc_keeps_freed_memory"] is False
    a = load_file(str(tmp_path / "kept/model.safetensors"))
    b = load_file(str(tmp_path / "glibc/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ((tmp_path / "kept/metrics.jsonl").read_bytes()
            == (tmp_path / "glibc/metrics.jsonl").read_bytes())
