"""Facts of the paper's networks: parameter counts, multiply-adds (Table 1), torchvision parity."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from reslab import build_model, list_models
from reslab.blocks import ResidualBlock, ZeroPadShortcut
from reslab.complexity import count_params, describe
from reslab.models import SHORTCUTS, model_family

CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth,params", sorted(CIFAR_PARAMS.items()))
def test_cifar_param_counts_option_a_b_and_plain(depth, params):
    assert count_params(build_model(f"resnet{depth}")) == params
    assert count_params(build_model(f"resnet{depth}", shortcut="B")) == params + 2_752
    assert count_params(build_model(f"plain{depth}")) == params


def test_resnet1202_params_and_multiply_adds():
    info = describe("resnet1202")  # meta device: no 19M-parameter allocation
    assert info.params == 19_421_274
    assert info.multiply_adds == pytest.approx(2_829e6, rel=1e-3)


@pytest.mark.parametrize("depth,madds", [(20, 40.6e6), (32, 68.9e6), (44, 97.2e6),
                                          (56, 125.5e6), (110, 252.9e6)])
def test_cifar_multiply_adds(depth, madds):
    assert describe(f"resnet{depth}").multiply_adds == pytest.approx(madds, rel=2e-3)


@pytest.mark.parametrize("name,layout,gmadds", [
    ("resnet18", "v1", 1.81), ("resnet34", "v1", 3.66), ("resnet50", "v1", 3.86),
    ("resnet101", "v1", 7.57), ("resnet152", "v1", 11.28),
    ("resnet50", "v1.5", 4.09), ("resnet101", "v1.5", 7.80), ("resnet152", "v1.5", 11.51),
])
def test_imagenet_multiply_adds_table1(name, layout, gmadds):
    info = describe(name, layout=layout)
    assert info.multiply_adds / 1e9 == pytest.approx(gmadds, rel=0.01)


def test_table1_output_sizes():
    stages = dict(describe("resnet50").stages)
    assert stages == {"conv1": (64, 112, 112), "conv2_x": (256, 56, 56),
                      "conv3_x": (512, 28, 28), "conv4_x": (1024, 14, 14),
                      "conv5_x": (2048, 7, 7)}
    assert dict(describe("resnet56").stages)["conv4_x"] == (64, 8, 8)


def test_torchvision_param_counts():
    assert describe("resnet18").params == 11_689_512
    assert describe("resnet50").params == 25_557_032


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_torchvision_parity(depth):
    tv = pytest.importorskip("torchvision").models
    torch.manual_seed(depth)
    theirs = getattr(tv, f"resnet{depth}")(weights=None).eval()
    # Random BN statistics so the comparison exercises every buffer, not just the init values.
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ours = build_model(f"resnet{depth}", layout="v1.5", shortcut="B").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff <= 1e-4


def test_state_dict_names_follow_torchvision():
    keys = set(build_model("resnet20", shortcut="B").state_dict())
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
            "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "fc.weight",
            "fc.bias"} <= keys
    assert not any("downsample" in k for k in build_model("resnet20").state_dict())


# Every model and option: shapes, in_channels=1, gradients, copies, export.
VARIANTS = [
    ("resnet8", {}), ("plain8", {}),
    *[("resnet8", {"shortcut": s}) for s in SHORTCUTS if s != "none"],
    ("resnet8", {"shortcut": "none"}),
    ("resnet8", {"layers_per_block": 1}), ("resnet11", {"layers_per_block": 3}),
    ("resnet14", {"layers_per_block": 2, "shortcut": "gated"}),
    ("resnet20", {"zero_init_residual": True}),
]


@pytest.mark.parametrize("name,opts", VARIANTS, ids=[f"{n}-{o}" for n, o in VARIANTS])
def test_cifar_variants_forward_backward_copy(name, opts):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=7, **opts)
    x = torch.randn(4, 1, 32, 32)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(copy.deepcopy(model)(x), ref)
        buf = io.BytesIO()
        torch.save(model, buf)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), ref)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), ref, atol=1e-5)


def test_every_listed_model_forward():
    for name in list_models():
        if name == "resnet1202":
            continue  # counted on meta above; same code path as resnet110 with n=200
        model = build_model(name).eval()
        size = {"cifar": 32, "imagenet": 224}.get(model_family(name), 28)  # twins: 28x28
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        assert out.shape == (1, model.fc.out_features), name


@pytest.mark.parametrize("shortcut", ["A", "B", "C", "gated", "scaled", "fixed"])
def test_imagenet_shortcuts_and_layouts(shortcut):
    for layout in ("v1", "v1.5"):
        model = build_model("resnet50", shortcut=shortcut, layout=layout, num_classes=5,
                             in_channels=1)
        out = model(torch.randn(2, 1, 64, 64))
        assert out.shape == (2, 5)
    block = build_model("resnet50", layout="v1").layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    block = build_model("resnet50", layout="v1.5").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_option_c_projects_every_shortcut_and_a_has_no_lambdas():
    c = build_model("resnet20", shortcut="C")
    blocks = [m for m in c.modules() if isinstance(m, ResidualBlock)]
    assert all(isinstance(b.downsample, nn.Sequential) for b in blocks)
    a = build_model("resnet20")
    pads = [m for m in a.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(pads) == 2
    for m in a.modules():
        for v in vars(m).values():
            assert getattr(v, "__name__", "") != "<lambda>"


def test_layers_per_block_counts():
    for k, name in [(1, "resnet56"), (2, "resnet56"), (3, "resnet56")]:
        model = build_model(name, layers_per_block=k)
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
        assert all(b.num_layers == k for b in blocks)
        assert convs + 1 == 56  # 3x3 convs + the fc: depth stays 56 with 18, 9 or 6 blocks/stage


def test_gated_block_starts_near_identity_and_scale_gets_gradient():
    torch.manual_seed(0)
    block = build_model("resnet20", shortcut="gated").layer1[1]
    x = torch.randn(2, 16, 8, 8).relu()
    out = block(x)
    residual_share = (out - x.relu()).abs().mean() / x.abs().mean()
    assert residual_share < 0.1
    model = build_model("resnet8", shortcut="scaled")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    scales = [m.shortcut_scale for m in model.modules() if isinstance(m, ResidualBlock)]
    assert all(s.item() == 1.0 and s.grad is not None and s.grad.abs() > 0 for s in scales)


def test_gradient_checkpointing_matches_and_keeps_bn_stats():
    torch.manual_seed(0)
    a = build_model("resnet14")
    b = copy.deepcopy(a)
    b.gradient_checkpointing = True
    x = torch.randn(4, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb), n  # recomputation must not update BN statistics twice


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "resnet9"}, "6n\\+2"),
    ({"name": "vgg16"}, "valid names"),
    ({"name": "plain50"}, "plain18 and plain34"),
    ({"name": "resnet20", "shortcut": "D"}, "valid: A, B, C"),
    ({"name": "resnet50", "layout": "v2"}, "valid: v1, v1.5"),
    ({"name": "resnet50", "layers_per_block": 2}, "exactly 3"),
    ({"name": "resnet20", "layers_per_block": 4}, "1, 2 or 3"),
    ({"name": "resnet22", "layers_per_block": 3}, "9n\\+2"),
    ({"name": "plain20", "shortcut": "A"}, "plain net"),
    ({"name": "resnet20", "num_classes": 0}, "num_classes"),
])
def test_bad_input_raises_value_error(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


@pytest.mark.parametrize("name,opts", [("resnet18", {}), ("resnet50", {"layout": "v1.5"}),
                                        ("plain34", {})])
def test_imagenet_family_copies_and_exports(name, opts):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **opts).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), ref)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), ref, atol=1e-5)
