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
    drop = (*allocator.USER_SETTINGS, "GLIBC_TUNABLES", allocator.OPT_OUT, allocator.HUGE_PAGES)
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_not_faulted_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CYCLE, mode], capture_output=True,
                             text=True, check=True, env=_env_without_malloc_settings())
        return int(out.stdout.split()[-1])

    pages = 5 * 3 * 8 * 2**20 // 4096  # what five passes touch
    assert faults("default") > pages // 2  # the control: glibc's defaults do fault
    assert faults("keep") < pages // 50


@pytest.mark.parametrize("name, value", [
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
    ("RESLAB_KEEP_FREED_MEMORY", "0"),
])
def test_users_malloc_settings_win(monkeypatch, name, value):
    monkeypatch.setattr(allocator, "_kept", False)
    for other in (*allocator.USER_SETTINGS, "GLIBC_TUNABLES", allocator.OPT_OUT):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    assert allocator.keep_freed_memory() is False
    assert allocator.kept() is False


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_training_is_bitwise_the_same_either_way(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", make_dataset(n_train=64, size=16))
    args = ["resnet8", "--data", str(folder), "--iterations", "30", "--batch-size", "16",
            "--eval-every", "15", "--log-every", "5", "--deterministic", "--no-progress"]
    base = dict(_env_without_malloc_settings(), OMP_NUM_THREADS="1")
    # A user's own threshold (glibc's static default) makes reslab leave malloc alone.
    untuned = dict(base, MALLOC_MMAP_THRESHOLD_="131072", THP_MEM_ALLOC_ENABLE="0")
    for name, env in (("kept", base), ("glibc", untuned)):
        subprocess.run([sys.executable, "-m", "reslab", "train", *args, "--out",
                        str(tmp_path / name)], env=env, check=True, capture_output=True)
    envs = {n: json.loads((tmp_path / n / "env.json").read_text()) for n in ("kept", "glibc")}
    assert envs["kept"]["malloc_keeps_freed_memory"] is True
    assert envs["glibc"]["malloc_keeps_freed_memory"] is False
    assert envs["kept"]["huge_pages"] is allocator.kernel_allows_huge_pages()
    assert envs["glibc"]["huge_pages"] is False
    a = load_file(str(tmp_path / "kept/model.safetensors"))
    b = load_file(str(tmp_path / "glibc/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ((tmp_path / "kept/metrics.jsonl").read_bytes()
            == (tmp_path / "glibc/metrics.jsonl").read_bytes())


HUGE = """
import sys, torch
from reslab import allocator
if sys.argv[1] == "late":
    torch.ones(4)  # torch has now read its switch, unset
print(allocator.use_huge_pages())
"""


@pytest.mark.skipif(not allocator.kernel_allows_huge_pages(), reason="kernel: no huge pages")
def test_huge_pages_are_asked_for_before_the_first_tensor_only():
    def run(when: str, **extra: str) -> str:
        env = dict(_env_without_malloc_settings(), **extra)
        out = subprocess.run([sys.executable, "-c", HUGE, when], capture_output=True,
                             text=True, check=True, env=env)
        return out.stdout.split()[-1]

    assert run("first") == "True"
    assert run("late") == "False"  # reported as it is, not as asked
    assert run("first", THP_MEM_ALLOC_ENABLE="0") == "False"  # the user's choice wins
