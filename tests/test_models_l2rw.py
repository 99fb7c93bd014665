"""Models of the learning-to-reweight experiments (LeNet, ResNet-32, WRN-28-10): shapes, exact
parameter counts, and use under torch.func.functional_call with substituted parameters and
batch-norm buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metarun.models import CifarResNet, LeNet, WideResNet, resnet32, wrn28_10


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def _bn(c: int) -> int:
    return 2 * c  # weight and bias


# --------------------------------------------------------------------------- LeNet


def test_lenet_ren2018_shape_layers_and_exact_parameter_count() -> None:
    model = LeNet()
    assert model(torch.zeros(8, 1, 28, 28)).shape == (8, 2)
    # Official L2RW MNIST net: 5x5 convs 1->16->32->64 ('same'), 3x3/2 max-pool after each
    # (28 -> 14 -> 7 -> 4), fc 1024 -> 100 -> classes.
    convs = _conv(5, 1, 16, True) + _conv(5, 16, 32, True) + _conv(5, 32, 64, True)
    fc = (1024 * 100 + 100) + (100 * 2 + 2)
    assert _count(model) == convs + fc == 167_214
    assert _count(LeNet(num_classes=1)) == 167_214 - 101  # the official single sigmoid logit
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 64, 4, 4)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_lenet5_variant_shape_and_exact_parameter_count() -> None:
    model = LeNet(num_classes=10, variant="lenet5")
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    convs = _conv(5, 1, 6, True) + _conv(5, 6, 16, True)
    fc = (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert _count(model) == convs + fc == 61_706
    assert LeNet(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_lenet_bad_arguments() -> None:
    with pytest.raises(ValueError, match="variant must be one of ren2018, lenet5, got 'lenet'"):
        LeNet(variant="lenet")
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        LeNet(num_classes=0)
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        LeNet(variant="lenet5", image_size=8)


# --------------------------------------------------------------------------- ResNet-32


def _resnet32_count(num_classes: int) -> int:
    stem = _conv(3, 3, 16) + _bn(16)
    stage1 = 5 * 2 * (_conv(3, 16, 16) + _bn(16))
    # First block of stages 2 and 3: conv in -> out, then conv out -> out; option A shortcut.
    stage2 = (_conv(3, 16, 32) + _bn(32)) + 9 * (_conv(3, 32, 32) + _bn(32))
    stage3 = (_conv(3, 32, 64) + _bn(64)) + 9 * (_conv(3, 64, 64) + _bn(64))
    return stem + stage1 + stage2 + stage3 + 64 * num_classes + num_classes


def test_resnet32_shape_layers_and_exact_parameter_count() -> None:
    model = resnet32()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert _count(model) == _resnet32_count(10) == 464_154  # He et al. 2016, Table 6: 0.46M
    assert _count(resnet32(num_classes=100)) == _resnet32_count(100) == 470_004
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 32  # 6n + 2 weighted layers, n = 5
    assert all(c.kernel_size == (3, 3) for c in convs)  # option A: no 1x1 projections
    assert [c.stride for c in convs].count((2, 2)) == 2
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    h = torch.zeros(1, 16, 32, 32)
    assert model.layer1(h).shape == (1, 16, 32, 32)
    assert model.layer3(model.layer2(h)).shape == (1, 64, 8, 8)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = CifarResNet(8).layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    assert not list(block.shortcut.parameters())


def test_cifar_resnet_other_depths_and_errors() -> None:
    assert len([m for m in CifarResNet(20).modules() if isinstance(m, nn.Conv2d)]) == 19
    with pytest.raises(
        ValueError, match="depth must be 6n \\+ 2 with n >= 1 \\(e.g. 32\\), got 30"
    ):
        CifarResNet(30)


# --------------------------------------------------------------------------- Wide ResNet


def _wrn_count(depth: int, k: int, num_classes: int) -> int:
    n = (depth - 4) // 6
    total = _conv(3, 3, 16)
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            block = _bn(c_in) + _conv(3, c_in, width) + _bn(width) + _conv(3, width, width)
            if j == 0 and c_in != width or j == 0 and width != 16 * k:
                block += _conv(1, c_in, width)  # projection shortcut
            total += block
            c_in = width
    return total + _bn(c_in) + c_in * num_classes + num_classes


def test_wrn28_10_exact_parameter_count_and_shape() -> None:
    torch.manual_seed(0)
    model = wrn28_10()
    assert _count(model) == _wrn_count(28, 10, 10) == 36_479_194  # Zagoruyko & Komodakis: 36.5M
    assert [len(s) for s in (model.block1, model.block2, model.block3)] == [4, 4, 4]
    shortcuts = [m.shortcut for m in model.modules() if hasattr(m, "shortcut")]
    assert sum(s is not None for s in shortcuts) == 3  # 1x1 convs where the width changes
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_wide_resnet_generic_and_errors() -> None:
    model = WideResNet(depth=16, widen_factor=2, num_classes=100)
    assert _count(model) == _wrn_count(16, 2, 100)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert _count(WideResNet(10, 1)) == _wrn_count(
        10, 1, 10
    )  # k = 1: the first stage has no projection
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\), got 1.0"):
        wrn28_10(dropout=1.0)


def test_wide_resnet_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules()) == 3
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


# --------------------------------------------------------------------------- functional_call


def _perturbed(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {
        n: (p.detach() + 0.05 * torch.randn_like(p)).requires_grad_()
        for n, p in model.named_parameters()
    }
    buffers = {
        n: (b.clone() + 0.1 if b.is_floating_point() else b.clone())
        for n, b in model.named_buffers()
    }
    return {**params, **buffers}


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: LeNet(), (6, 1, 28, 28)),
        (lambda: resnet32(), (3, 3, 32, 32)),
        (lambda: WideResNet(depth=10, widen_factor=2), (3, 3, 32, 32)),
    ],
    ids=["lenet", "resnet32", "wrn-10-2"],
)
def test_functional_call_with_substituted_parameters_and_buffers(make, shape) -> None:
    torch.manual_seed(0)
    model = make().eval()  # eval: batch norm reads the (substituted) running statistics
    x = torch.rand(*shape)
    before = copy.deepcopy(model.state_dict())
    state = _perturbed(model)
    params = {n: t for n, t in state.items() if t.requires_grad}
    out = functional_call(model, state, (x,))

    # Same as a copy of the model holding those tensors ...
    reference = copy.deepcopy(model)
    reference.load_state_dict({n: t.detach() for n, t in state.items()})
    torch.testing.assert_close(out, reference(x))
    # ... different from the model's own, which are untouched.
    assert not torch.allclose(out, model(x))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())

    # Gradients reach every substituted parameter, and second order works (L2RW's meta-step
    # differentiates a validation loss through one SGD step).
    loss = out.logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    assert all(g.shape == p.shape for g, p in zip(grads, params.values()))
    fast = {**state, **{n: p - 1e-3 * g for (n, p), g in zip(params.items(), grads)}}
    meta = torch.autograd.grad(
        functional_call(model, fast, (x,)).pow(2).mean(), list(params.values())
    )
    assert all(torch.isfinite(g).all() for g in meta) and sum(g.abs().sum() for g in meta) > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "make", [lambda: resnet32(), lambda: WideResNet(10, 1)], ids=["resnet32", "wrn"]
)
def test_train_mode_functional_call_updates_the_substituted_buffers_only(make) -> None:
    torch.manual_seed(0)
    model = make().train()
    own = copy.deepcopy(model.state_dict())
    state = _perturbed(model)
    x = torch.rand(4, 3, 32, 32)
    out = functional_call(model, state, (x,))
    assert out.shape == (4, 10)
    name = next(n for n in state if n.endswith("running_mean"))
    assert not torch.equal(state[name], own[name] + 0.1)  # the substituted buffer moved ...
    assert all(torch.equal(t, own[n]) for n, t in model.state_dict().items())  # ... not the model's
    counters = [t for n, t in state.items() if n.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 1 for c in counters)
