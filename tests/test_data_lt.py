"""Long-tailed CIFAR (``dataset=cifar10_lt`` / ``cifar100_lt``): the exponential profile's exact
per-class counts on generated files in the official format, a balanced clean set disjoint from
training, seeding, error messages, and the configs that come with the options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarun.config import ConfigError
from metarun.data.cifar_lt import Cifar10LTConfig, Cifar100LTConfig, load_cifar_lt, long_tail_counts
from metarun.testing import fingerprints, marked_label, write_cifar


def _profile(n_max: int, classes: int, factor: float) -> list[int]:
    """Cui et al. 2019: n_i = n_max * (1/factor)^(i/(C-1)), floored (the official code's int)."""
    return [
        int(np.floor(n_max * np.power(1.0 / factor, i / (classes - 1)))) for i in range(classes)
    ]


@pytest.mark.parametrize("factor", [10, 50, 100, 200])
def test_profile_on_full_cifar_sizes(factor) -> None:
    """The official code's counts: 4,990 head images on CIFAR-10 and 490 on CIFAR-100 (10 clean
    images per class taken out first), tail ``floor(head / factor)``."""
    for classes, head in ((10, 4990), (100, 490)):
        counts = long_tail_counts(head, classes, factor)
        assert counts == _profile(head, classes, factor)
        assert counts[0] == head and counts[-1] == math.floor(head / factor)
        assert counts == sorted(counts, reverse=True)
    # The imbalance-100 CIFAR-10 pool (Shu et al. 2019): 12,380 images, 49 in the tail class.
    assert sum(long_tail_counts(4990, 10, 100)) == 12380


def test_profile_edge_cases() -> None:
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]  # factor 1: balanced, no rounding loss
    with pytest.raises(ValueError, match="dataset.imbalance must be >= 1"):
        long_tail_counts(10, 10, 0.5)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        long_tail_counts(10, 1, 10)


@pytest.mark.parametrize(
    ("classes", "per_class", "clean", "factor"), [(10, 30, 2, 10), (100, 6, 1, 5)]
)
def test_loader_counts_clean_set_and_test_set(tmp_path, classes, per_class, clean, factor) -> None:
    write_cifar(tmp_path, classes, per_class=per_class, test_per_class=2, pixels="marked")
    data = load_cifar_lt(
        tmp_path, num_classes=classes, imbalance=factor, n_clean_per_class=clean, seed=3
    )
    expected = _profile(per_class - clean, classes, factor)
    assert torch.bincount(data.train_y, minlength=classes).tolist() == expected
    # Clean set: balanced, true labels, disjoint from training.
    assert torch.bincount(data.val_y, minlength=classes).tolist() == [clean] * classes
    assert torch.equal(data.val_y, marked_label(data.val_x))
    assert torch.equal(data.train_y, marked_label(data.train_x))
    assert not set(fingerprints(data.train_x)) & set(fingerprints(data.val_x))
    # Official test set, untouched and balanced.
    assert torch.bincount(data.test_y, minlength=classes).tolist() == [2] * classes
    assert (
        data.train_x.dtype == torch.float32 and 0 <= data.train_x.min() <= data.train_x.max() <= 1
    )
    assert data.num_classes == classes and data.train_y_true is None


def test_loader_is_seeded(tmp_path) -> None:
    write_cifar(tmp_path, 10, per_class=30, pixels="marked")
    a = load_cifar_lt(tmp_path, imbalance=10, n_clean_per_class=2, seed=0)
    b = load_cifar_lt(tmp_path, imbalance=10, n_clean_per_class=2, seed=0)
    c = load_cifar_lt(tmp_path, imbalance=10, n_clean_per_class=2, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_x, b.val_x)
    assert set(fingerprints(a.train_x)) != set(fingerprints(c.train_x))
    assert torch.equal(torch.bincount(a.train_y), torch.bincount(c.train_y))


def test_loader_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar_lt(tmp_path / "nothing")
    write_cifar(tmp_path, 10, per_class=4, pixels="marked")
    with pytest.raises(ValueError, match="n_clean_per_class"):
        load_cifar_lt(tmp_path, n_clean_per_class=5)
    with pytest.raises(ValueError, match="dataset.num_classes must be 10"):
        load_cifar_lt(tmp_path, num_classes=20)


@pytest.mark.parametrize(
    ("schema", "kwargs", "message"),
    [
        (Cifar10LTConfig, {"imbalance": 0.5}, "dataset.imbalance must be >= 1"),
        (Cifar10LTConfig, {"num_classes": 100}, "dataset=cifar100_lt for CIFAR-100"),
        (Cifar100LTConfig, {"num_classes": 10}, "dataset=cifar10_lt for CIFAR-10"),
        (Cifar10LTConfig, {"n_clean_per_class": 0}, "dataset.n_clean_per_class must be >= 1"),
        (Cifar10LTConfig, {"clean_batch_size": 101}, "dataset.clean_batch_size must be null or"),
        (Cifar10LTConfig, {"crop_padding": 20}, "dataset.crop_padding must be in [0, 16]"),
    ],
)
def test_schema_checks_name_key_and_value(schema, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        schema(**kwargs)


def test_options_and_their_settings_compose(make_config) -> None:
    from metarun.config import MWNConfig, ResNet32Config

    run = make_config(["algo=mwn", "dataset=cifar10_lt"])
    assert isinstance(run.algo, MWNConfig) and isinstance(run.model, ResNet32Config)
    assert (run.dataset.imbalance, run.dataset.n_clean_per_class, run.model.num_classes) == (
        100.0,
        10,
        10,
    )
    # The official class-imbalance schedule at imbalance 100 (124 steps an epoch, 100 epochs).
    assert (run.outer_steps, run.meta_optimizer.milestones) == (12400, [9796, 11036])
    assert (run.meta_optimizer.lr, run.meta_optimizer.weight_decay) == (0.1, 0.0005)
    assert run.algo.normalize
    # The official code's weight-net rate for long-tailed CIFAR is the preset's (a value chosen
    # for MWN on this data; without the preset the run reports it as generic).
    assert make_config(["experiment=cifar10_lt_mwn"]).algo.weight_net_lr == 1e-5
    assert make_config(["experiment=cifar100_lt_mwn"]).algo.weight_net_lr == 1e-5
    hundred = make_config(["algo=erm", "dataset=cifar100_lt", "dataset.imbalance=50"])
    assert hundred.model.num_classes == 100 and hundred.dataset.imbalance == 50
    assert (hundred.outer_steps, hundred.meta_optimizer.milestones) == (10700, [8453, 9523])
