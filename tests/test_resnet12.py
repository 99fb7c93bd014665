"""ResNet-12: shapes, float64 gradients against finite differences, functional_call, MAML's vmap
meta-gradients equal to its task loop's, the embedding ProtoNets uses, and its config."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonets import ProtoNets
from metarun.config import ConfigError
from metarun.data import FewShotTasks
from metarun.models import ResNet12
from metarun.tasks import TaskBatch

DT = torch.float64
TINY = (3, 4, 4, 5)


def test_output_and_embedding_sizes():
    model = ResNet12(num_classes=5, widths=TINY)
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)  # average pooling: any size
    assert model.classifier.in_features == 5
    flat = ResNet12(num_classes=5, widths=TINY, image_size=84, avg_pool=False)
    assert flat.classifier.in_features == 5 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    assert flat(torch.zeros(1, 3, 84, 84)).shape == (1, 5)
    default = ResNet12(num_classes=5)
    widths = [m.out_channels for n, m in default.named_modules() if n.endswith("conv1")]
    assert widths == [64, 160, 320, 640]  # MetaOptNet's


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="widths must be 4 positive numbers"):
        ResNet12(widths=(8, 8))
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        ResNet12(image_size=8)


def test_gradients_match_finite_differences_in_float64():
    torch.manual_seed(0)
    model = ResNet12(num_classes=3, widths=(2, 2, 3, 3), image_size=16).to(DT)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(3, 3, 16, 16, dtype=DT)
    names = list(params)

    def loss(*values: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, values, strict=True)), (x,))
        return out.pow(2).sum()

    # Batch statistics (training mode): the normalisation is part of the differentiated function.
    # fast_mode: finite differences along random directions, not the whole Jacobian.
    assert torch.autograd.gradcheck(
        loss, tuple(params.values()), eps=1e-6, atol=1e-5, fast_mode=True
    )


def test_functional_call_uses_the_given_parameters():
    torch.manual_seed(0)
    model = ResNet12(num_classes=4, widths=TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    shifted = {k: v + 0.1 for k, v in model.named_parameters()}
    out = functional_call(model, shifted, (x,))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shifted[name])
    torch.testing.assert_close(out, model(x))


def _batch() -> TaskBatch:
    pool = torch.randint(0, 256, (8, 4, 16, 16, 3), generator=torch.Generator().manual_seed(0))
    tasks = FewShotTasks(pool.to(torch.uint8), 3, 1, 2)
    b = tasks.sample(3, torch.Generator().manual_seed(1))
    return TaskBatch(b.support_x.to(DT), b.support_y, b.query_x.to(DT), b.query_y)


def _maml_grads(mode: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = ResNet12(num_classes=3, widths=(2, 3, 3, 4), image_size=16).to(DT)
    algo = MAML(
        model,
        task_type="classification",
        inner_lr=0.1,
        inner_steps=2,
        eval_inner_steps=2,
        task_batching=mode,
    ).to(DT)
    algo.meta_train_step(_batch())
    return [p.grad.clone() for p in algo.meta_parameters()]


def test_maml_vmap_meta_gradients_equal_the_task_loops():
    loop, vmapped = _maml_grads("loop"), _maml_grads("vmap")
    flat_loop = torch.cat([g.flatten() for g in loop])
    flat_vmap = torch.cat([g.flatten() for g in vmapped])
    assert flat_loop.norm() > 0
    assert ((flat_loop - flat_vmap).norm() / flat_loop.norm()).item() < 1e-10


def test_protonets_embeds_with_the_pooled_features():
    model = ResNet12(num_classes=5, widths=TINY)
    algo = ProtoNets(model)
    assert algo.embedding_head == "classifier"
    support = torch.randn(5, 3, 32, 32)
    adapted = algo.adapt(support, torch.arange(5))
    assert algo.predict(adapted, torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_config_checks_name_the_key(make_config):
    with pytest.raises(ConfigError, match="model.widths must be 4 positive filter counts"):
        make_config(["dataset=miniimagenet", "model=resnet12", "model.widths=[8,8]"])
    run = make_config(["dataset=cifar_fs", "model=resnet12", "model.widths=[64,128,256,512]"])
    assert run.model.image_size == 32 and run.model.num_classes == 5
