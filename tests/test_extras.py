"""Optional parts are extras (pyproject.toml): without one, the command that needs it says which
extra to install, in one line, and nothing else breaks."""

import sys
from pathlib import Path

import pytest
import tomllib

from conftest import make_dataset, write_image_folder
from reslab.cli import main
from reslab.runtime import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without(monkeypatch):
    """Make importing the named modules fail, as if not installed (None in sys.modules)."""
    def hide(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_the_extras_are_declared_and_the_core_needs_none_of_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert module not in core
        assert any(req.startswith(module) for req in extras[extra]), (module, extra)
    assert "reslab[export,tensorboard,plots]" in extras["dev"]
    for needed in ("torch", "torchvision", "numpy", "pillow", "safetensors", "tqdm"):
        assert needed in core


def test_a_missing_extra_is_named(without):
    without("matplotlib")
    with pytest.raises(MissingExtra, match=r"pip install 'reslab\[plots\]'"):
        require("matplotlib", "the report's plots")


def test_training_without_tensorboard_notes_it_and_goes_on(without, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "data", make_dataset())
    without("tensorboard")
    assert main(["train", "resnet8", "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--iterations", "2", "--batch-size", "16", "--no-progress"]) == 0
    assert "pip install 'reslab[tensorboard]'" in capsys.readouterr().out
    assert not (tmp_path / "run" / "tb").exists()
    without("onnx")
    assert main(["export", str(tmp_path / "run"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'reslab[export]'" in err[0]
    assert not (tmp_path / "run" / "model.onnx").exists()
    without("matplotlib")
    assert main(["reproduce", "table6", "--data", str(folder), "--out", str(tmp_path / "t6"),
                 "--depths", "8", "--iterations", "2"]) == 2
    assert "reslab[plots]" in capsys.readouterr().err and not (tmp_path / "t6").exists()
