"""`pip install` without make (issue 40): a wheel built from the repository, installed into a
fresh virtual environment, trains, evaluates and predicts, and names its JPEG decoder; without
a compiler the build falls back, saying so, and reslab decodes whole images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import make_dataset, write_image_folder

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "reslab")


def _build(tmp: Path, env: dict | None = None) -> tuple[Path, str]:
    """The wheel of a clean copy of the sources (no built library, no caches), and pip's log.
    Offline: the build backend is this interpreter's setuptools (--no-build-isolation)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(REPO / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-v", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("reslab-*.whl")
    return wheel, out.stdout + out.stderr


def _venv(tmp: Path, wheel: Path) -> Path:
    """A fresh venv where `pip install WHEEL` alone brings reslab and every dependency (torch
    too, from the package registries this machine's pip is pointed at: 1.7 min and 5.5 GB
    here, so the test is slow)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    out = subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    return venv


def _borrowing_venv(tmp: Path, wheel: Path) -> Path:
    """A fresh venv with `pip install --no-deps WHEEL`, borrowing torch and the rest from this
    interpreter's site-packages (a .pth line): what the decoder fall-back needs, in seconds. No
    pip or setuptools of its own (an older setuptools would shadow the one torch needs): this
    pip installs into it (--python)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], capture_output=True,
                               text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                          "install", "--no-index", "--no-deps", str(wheel)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return venv


def _reslab(venv: Path, cwd: Path, *args: str) -> str:
    out = subprocess.run([venv / "bin" / "reslab", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (args, out.stderr[-2000:])
    return out.stdout


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_trains_evaluates_predicts_and_names_its_decoder(tmp_path):
    wheel, _ = _build(tmp_path)
    assert "reslab/data/_jpeg_region.so" in zipfile.ZipFile(wheel).namelist()
    venv = _venv(tmp_path, wheel)
    work = tmp_path / "work"  # not the checkout: the venv's reslab is imported
    data = write_image_folder(work / "data", make_dataset(n_train=48, n_test=12, channels=3))
    where = subprocess.run([venv / "bin" / "python", "-c", "import reslab, torch; print("
                            "reslab.__file__, torch.__file__)"], cwd=work, capture_output=True,
                           text=True, check=True).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # nothing borrowed
    assert "JPEG decoder: libjpeg-turbo regions" in _reslab(venv, work, "--version")
    _reslab(venv, work, "train", "resnet8", "--data", "data", "--out", "run", "--iterations", "4",
            "--batch-size", "16", "--no-progress", "--compile", "off")
    report = json.loads(_reslab(venv, work, "eval", "run", "--data", "data", "--json"))
    assert report["images"] == 12
    predicted = json.loads(_reslab(venv, work, "predict", "run", str(data / "test"), "--json"))
    assert len(predicted["predictions"]) == 12


@pytest.mark.slow
def test_without_a_compiler_the_build_says_so_and_reslab_decodes_whole_images(tmp_path):
    import os

    wheel, log = _build(tmp_path, env={**os.environ, "CC": str(tmp_path / "no-such-cc")})
    assert "the JPEG region decoder was not built" in log
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    venv = _borrowing_venv(tmp_path, wheel)
    assert "JPEG decoder: whole images" in _reslab(venv, tmp_path, "--version")


def test_version_names_the_jpeg_decoder_in_use(capsys):
    from reslab.cli import main
    from reslab.data import jpeg

    assert main(["--version"]) == 0
    line = capsys.readouterr().out
    assert len(line.splitlines()) == 1
    assert ("libjpeg-turbo regions" if jpeg.available() else "whole images") in line
