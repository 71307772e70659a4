"""The fully connected and recurrent twins (mlp_rnn.py) and their depth studies."""

import json

import pytest
import torch
from PIL import Image

from conftest import make_dataset, write_image_folder
from reslab import build_model
from reslab.cli import main
from reslab.complexity import count_params, describe
from reslab.depth_studies import claims
from reslab.mlp_rnn import LSTMBlock, MLPBlock
from reslab.train import load_trained


def mlp_params(depth: int, width: int = 128, inputs: int = 784, classes: int = 10) -> int:
    bn = 2 * width  # gamma and beta
    blocks = (depth - 2) // 2
    return inputs * width + bn + blocks * 2 * (width * width + bn) + width * classes + classes


def lstm_params(depth: int, hidden: int = 64, row: int = 28, classes: int = 10) -> int:
    def layer(inputs: int) -> int:  # four gates: input and recurrent weights, two biases
        return 4 * hidden * inputs + 4 * hidden * hidden + 2 * 4 * hidden
    return layer(row) + (depth - 1) * layer(hidden) + hidden * classes + classes


@pytest.mark.parametrize("depth", [4, 20, 56])
def test_mlp_param_counts_equal_a_hand_count(depth):
    for kind in ("res", "plain"):
        assert count_params(build_model(f"{kind}mlp{depth}", in_channels=1)) == mlp_params(depth)
    assert mlp_params(20) == 401_418


@pytest.mark.parametrize("depth", [1, 4, 16])
def test_lstm_param_counts_equal_a_hand_count(depth):
    for kind in ("res", "plain"):
        assert count_params(build_model(f"{kind}lstm{depth}", in_channels=1)) == \
            lstm_params(depth)
    assert lstm_params(4) == 124_554
    # RGB rows are 3 x 28 values a step; a 32-wide image's rows are 32.
    assert count_params(build_model("reslstm2", input_size=(32, 32))) == lstm_params(2, row=96)


@pytest.mark.parametrize("kind", ["mlp8", "lstm4"])
def test_twins_differ_only_by_the_shortcuts(kind):
    torch.manual_seed(0)
    res = build_model(f"res{kind}", in_channels=1)
    torch.manual_seed(0)
    plain = build_model(f"plain{kind}", in_channels=1)
    a, b = res.state_dict(), plain.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same layers, same initialisation
    x = torch.rand(4, 1, 28, 28)
    assert not torch.equal(res(x), plain(x))  # ... and the shortcuts change the function
    blocks = [m for m in res.modules() if isinstance(m, (MLPBlock, LSTMBlock))]
    assert all(b.residual for b in res.blocks) and not any(b.residual for b in plain.blocks)
    assert not res.stem.residual if kind.startswith("lstm") else len(blocks) == 3


@pytest.mark.parametrize("kind", ["mlp20", "lstm8"])
def test_a_residual_stack_at_initialisation_passes_its_input_through_each_shortcut(kind):
    """zero_init_residual makes each residual function exactly 0, so each block returns its
    input bit for bit; the plain twin (no addition) returns zeros instead."""
    for arm in ("res", "plain"):
        torch.manual_seed(0)
        model = build_model(f"{arm}{kind}", in_channels=1, zero_init_residual=True).eval()
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(_m, i, o, seen=seen):
            seen.append((i[0], o))

        hooks = [b.register_forward_hook(keep) for b in model.blocks]
        with torch.no_grad():
            model(torch.rand(5, 1, 28, 28))
        for h in hooks:
            h.remove()
        assert len(seen) == len(model.blocks) > 0
        if arm == "res":
            assert all(torch.equal(out, inp) for inp, out in seen)
        else:  # the first plain block already drops its (nonzero) input
            assert torch.count_nonzero(seen[0][1]) == 0 and torch.count_nonzero(seen[0][0]) > 0


def test_twins_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match="even and >= 4"):
        build_model("resmlp7")
    with pytest.raises(ValueError, match="omit --shortcut"):
        build_model("resmlp8", shortcut="B")
    with pytest.raises(ValueError, match="--layout or --layers-per-block"):
        build_model("reslstm4", layout="v1.5")
    model = build_model("resmlp8", in_channels=1)
    with pytest.raises(ValueError, match="built for 28x28 images, got 32x32"):
        model(torch.rand(2, 1, 32, 32))
    assert describe("plainlstm16", in_channels=1).params == lstm_params(16)
    assert [s for s, _ in describe("resmlp8").stages] == ["stem", "blocks"]


def test_twins_train_eval_resume_export_and_predict(tmp_path, capsys):
    """A first-class net: trained by the CLI on an image folder, evaluated to its logged error,
    frozen by part, exported to ONNX and asked to predict."""
    data = make_dataset(n_train=64, n_test=24, size=12, classes=3, channels=1)
    folder = write_image_folder(tmp_path / "data", data)
    for model, recipe in (("resmlp6", "mlp"), ("reslstm3", "rnn")):
        run = tmp_path / model
        args = ["train", model, "--data", str(folder), "--out", str(run), "--recipe", recipe,
                "--iterations", "6", "--batch-size", "16", "--no-progress"]
        assert main(args) == 0
        logged = json.loads((run / "summary.json").read_text())["final_test_error"]
        capsys.readouterr()
        assert main(["eval", str(run), "--data", str(folder), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["test_error"] == logged
        trained = load_trained(run)
        assert trained.input_size == (12, 12) and trained.model.input_size == (12, 12)
        onnx = tmp_path / f"{model}.onnx"
        assert main(["export", str(run), "--format", "onnx", "--out", str(onnx)]) == 0
        image = tmp_path / "a.png"
        Image.fromarray(data.test_images[0, 0].numpy()).save(image)
        capsys.readouterr()
        assert main(["predict", str(onnx), str(image)]) == 0
        assert main(["predict", str(run), str(image)]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if "a.png" in line]
        assert len(lines) == 2 and lines[0].split()[1] == lines[1].split()[1]  # same class
    frozen = tmp_path / "frozen"
    assert main(["train", "resmlp6", "--data", str(folder), "--out", str(frozen), "--recipe",
                 "mlp", "--iterations", "2", "--batch-size", "16", "--no-progress",
                 "--init-from", str(tmp_path / "resmlp6"), "--freeze", "stem,blocks"]) == 0
    summary = json.loads((frozen / "summary.json").read_text())
    assert summary["trainable_params"] == 128 * 3 + 3  # only fc trains


def test_rnn_recipe_is_adam_with_clipping_and_mlp_recipe_sgd():
    from reslab.recipes import get_recipe
    from reslab.step import make_optimizer

    model = build_model("reslstm2", in_channels=1)
    rnn, mlp = get_recipe("rnn"), get_recipe("mlp")
    assert isinstance(make_optimizer(model, rnn, torch.device("cpu")), torch.optim.Adam)
    assert isinstance(make_optimizer(model, mlp, torch.device("cpu")), torch.optim.SGD)
    assert rnn.grad_clip == 1.0 and rnn.pad == 0 and mlp.pad == 0 and mlp.grad_clip == 0
    with pytest.raises(ValueError, match="optimizer must be sgd or adam"):
        type(rnn)(optimizer="rmsprop")
    with pytest.raises(ValueError, match="grad-clip"):
        type(rnn)(grad_clip=-1.0)


def _result(label: str, depth: int, train: float, test: float) -> dict:
    return {"label": label, "depth": depth, "final_train_error": train,
            "final_test_error": test, "params": 1}


def test_depth_claims_read_off_the_numbers():
    rs = [_result(f"mlp-{d} {arm}", d, tr, 0.2)
          for d, p, r in ((4, (0.10, 0.11), (0.10, 0.11)), (56, (0.30, 0.32), (0.05, 0.06)))
          for arm, pair in (("plain", p), ("residual", r)) for tr in pair]
    lines = claims(rs, num_classes=10)
    assert "1. Degradation" in lines[0] and "**holds**" in lines[0] and "4 (10.50" in lines[0]
    assert "2. The shortcuts remove it" in lines[1] and "**holds**" in lines[1]
    assert "it never rises" in lines[1]
    assert "trains lower than its plain twin: 5.50 ± 0.71% against 31.00 ± 1.41%" in lines[2]
    # A rise within the seeds' spread is not degradation.
    noisy = [dict(r, final_train_error=r["final_train_error"] + (0.3 if i % 2 else 0))
             for i, r in enumerate(rs)]
    assert "**does not hold**" in claims(noisy, num_classes=10)[0]
    # Near chance everywhere: no verdict.
    chance = [dict(r, final_test_error=0.88) for r in rs]
    assert claims(chance, num_classes=10)[0].startswith("- Too short to judge")
    # A one-layer LSTM is one net, counted in both arms.
    shared = [_result("lstm-1", 1, 0.2, 0.2), _result("lstm-2 plain", 2, 0.3, 0.3),
              _result("lstm-2 residual", 2, 0.1, 0.2)]
    lines = claims(shared, num_classes=10)
    assert "**holds**" in lines[0] and "**holds**" in lines[1]


def test_depth_study_end_to_end(tmp_path, capsys):
    data = make_dataset(n_train=64, n_test=24, size=12, classes=3, channels=1)
    folder = write_image_folder(tmp_path / "data", data)
    out = tmp_path / "rnn"
    args = ["study", "rnn-depth", "--data", str(folder), "--out", str(out), "--depths", "1", "2",
            "--iterations", "4", "--seeds", "2", "--batch-size", "16", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(e["label"] for e in summary) == sorted(["lstm-1", "lstm-2 plain",
                                                          "lstm-2 residual"] * 2)
    assert {e["run"] for e in summary if e["label"] == "lstm-1"} == {
        "plainlstm1-fp32-b16-4it-seed0", "plainlstm1-fp32-b16-4it-seed1"}
    report = (out / "report.md").read_text()
    assert "| 2 | " in report and "Adam, lr 0.001" in report and "clipped at 1" in report
    with Image.open(out / "depth.png") as im:
        im.verify()
    capsys.readouterr()
    assert main([*args, "--report-only"]) == 0
    assert (out / "report.md").read_text() == report


def test_lstm_multiply_adds_are_counted_as_the_flop_counter_counts_them():
    from reslab.complexity import count_multiply_adds, lstm_multiply_adds, stage_shapes

    for name, channels in (("reslstm3", 1), ("plainlstm2", 3)):
        with torch.device("meta"):
            model = build_model(name, in_channels=channels)
            x = torch.empty(1, channels, 28, 28)
        with torch.no_grad():
            counted, shapes = count_multiply_adds(model, x), stage_shapes(model, x)
        assert lstm_multiply_adds(model, 28) == (counted, shapes)
        assert describe(name, in_channels=channels).multiply_adds == counted
