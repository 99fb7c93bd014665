"""Models: output shapes, exact parameter counts, and use under torch.func.functional_call."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metarun.models import MLP, Conv4


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_shapes_and_parameter_count() -> None:
    model = MLP()
    assert model(torch.zeros(10, 1)).shape == (10, 1)
    assert model(torch.zeros(4, 10, 1)).shape == (4, 10, 1)  # any leading dims
    # Finn et al. 2017 sinusoid net: 1 -> 40 -> 40 -> 1.
    assert _count(model) == (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1) == 1761
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]  # no output activation
    assert _count(MLP(3, (), 2)) == 3 * 2 + 2
    assert MLP(in_features=3, hidden=(8,), out_features=4)(torch.zeros(2, 3)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"hidden=\[0\]"):
        MLP(hidden=(0,))


def test_mlp_output_can_be_negative() -> None:
    torch.manual_seed(0)
    out = MLP()(torch.linspace(-5, 5, 200).unsqueeze(-1))
    assert out.min() < 0 < out.max() or out.max() < 0  # linear output layer, not a ReLU


def test_conv4_omniglot_shape_and_exact_parameter_count() -> None:
    model = Conv4(in_channels=1, num_classes=5, hidden=64, image_size=28)
    assert model(torch.zeros(8, 1, 28, 28)).shape == (8, 5)
    conv1 = 64 * 1 * 3 * 3 + 64
    conv = 64 * 64 * 3 * 3 + 64
    bn = 2 * 64  # weight and bias
    # Strided convs: 28 -> 14 -> 7 -> 4 -> 2, so the classifier sees 64 * 2 * 2 features.
    linear = 64 * 2 * 2 * 5 + 5
    assert _count(model) == conv1 + 3 * conv + 4 * bn + linear == 113_221
    assert model.classifier.in_features == 256
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert _count(Conv4(batch_norm=False)) == 113_221 - 4 * bn


def test_conv4_max_pool_variant() -> None:
    # MiniImagenet (Finn et al. 2017): 32 filters, 84 -> 42 -> 21 -> 10 -> 5 by 2x2 max-pooling.
    model = Conv4(in_channels=3, num_classes=5, hidden=32, image_size=84, max_pool=True)
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert model.classifier.in_features == 32 * 5 * 5
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1)] * 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        Conv4(image_size=8, max_pool=True)


def test_conv4_state_is_parameters_and_batchnorm_buffers_only() -> None:
    model = Conv4()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(bn.track_running_stats for bn in bns)
    buffers = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
    assert buffers == {"running_mean", "running_var", "num_batches_tracked"}
    assert len(list(model.named_buffers())) == 4 * 3


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: MLP(), torch.linspace(-5, 5, 10).unsqueeze(-1)),
        (lambda: Conv4(hidden=8), torch.rand(6, 1, 28, 28)),
    ],
    ids=["mlp", "conv4"],
)
def test_functional_call_with_substituted_parameters(make, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = make().eval()  # eval: batch norm uses the running statistics, outputs comparable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {
        n: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_()
        for n, p in model.named_parameters()
    }
    out = functional_call(model, params, (x,))

    # Same as a copy of the model holding those parameters ...
    reference = copy.deepcopy(model)
    reference.load_state_dict(
        {**reference.state_dict(), **{n: p.detach() for n, p in params.items()}}
    )
    torch.testing.assert_close(out, reference(x))
    # ... different from the model's own, which are untouched.
    assert not torch.allclose(out, model(x))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # Gradients reach every substituted tensor, and second order works (MAML's meta-gradient).
    grads = torch.autograd.grad(out.pow(2).mean(), list(params.values()), create_graph=True)
    assert all(
        g is not None and g.shape == p.shape for g, p in zip(grads, params.values(), strict=True)
    )
    fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads, strict=True)}
    meta_loss = functional_call(model, fast, (x,)).pow(2).mean()
    meta = torch.autograd.grad(meta_loss, list(params.values()))
    assert all(torch.isfinite(g).all() for g in meta)
    assert sum(g.abs().sum() for g in meta) > 0
    assert all(p.grad is None for p in model.parameters())


def test_conv4_train_mode_functional_call_updates_only_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    model = Conv4(hidden=8).train()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    x = torch.rand(10, 1, 28, 28)
    out = functional_call(model, params, (x,))
    torch.testing.assert_close(out, model(x))  # batch statistics in train mode
    first_bn = model.features[0][1]
    assert first_bn.num_batches_tracked.item() == 2
    assert not torch.equal(first_bn.running_mean, torch.zeros(8))
