import json

from reslab.cli import main


def test_info_json_and_text(capsys):
    assert main(["info", "resnet56", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 853_018 and info["stages"]["conv4_x"] == [64, 8, 8]
    assert main(["info", "resnet50", "--input-size", "448"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "14x14, 2048" in out


def test_info_all_lists_every_model(capsys):
    assert main(["info", "--all"]) == 0
    out = capsys.readouterr().out
    for name in ["resnet20", "resnet1202", "plain110", "resnet152", "plain34"]:
        assert f"\n{name} " in out


def test_info_bad_model_exits_2(capsys):
    assert main(["info", "resnet9"]) == 2
    assert "6n+2" in capsys.readouterr().err
    assert main(["info", "resnet"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_version_names_reslab_torch_and_torchvision(capsys):
    from importlib.metadata import version

    import reslab

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert reslab.__version__ == version("reslab")  # the code's and the package's agree
    assert out.startswith(f"reslab {reslab.__version__} (torch {version('torch')}, torchvision "
                          f"{version('torchvision')}; JPEG decoder: ")  # test_wheel: which


def test_load_trained_is_public_api():
    import reslab
    import reslab.train

    assert "load_trained" in reslab.__all__ and reslab.load_trained is reslab.train.load_trained
