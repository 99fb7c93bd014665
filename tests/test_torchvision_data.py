"""``dataset=torchvision``: torchvision's own dataset classes (ImageFolder on real files, in
torchvision's on-disk layout) and a user's Dataset class by import path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from metarun.data import torchvision_data
from metarun.runner.build import build_tasks
from metarun.testing import write_image_folder as write_classes


class ColourDots(Dataset):
    """A user's own dataset: 12 classes of 6 uint8 images, labels in ``targets``."""

    classes = [f"dot{i}" for i in range(12)]

    def __init__(self, root: str, scale: int = 1) -> None:
        self.targets = [c for c in range(12) for _ in range(6)]
        self.scale = scale

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        label = self.targets[index]
        pixels = np.full((10, 14, 3), 20 * label * self.scale % 256, dtype=np.uint8)
        return pixels, label


def _config(make_config, *extra):
    return make_config(
        [
            "dataset=torchvision",
            "dataset.image_size=16",
            "dataset.n_way=2",
            "dataset.k_shot=1",
            "dataset.k_query=2",
            "model.hidden=8",
            *extra,
        ]
    )


def test_torchvision_image_folder_becomes_class_pools(tmp_path, make_config):
    names = write_classes(tmp_path / "imgs", 12, 4, nested=False)
    run = _config(
        make_config,
        "dataset.target=ImageFolder",
        f"dataset.root={tmp_path / 'imgs'}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    )
    pools = torchvision_data.load_torchvision(run.dataset)
    assert {s: len(p.names) for s, p in pools.items()} == {"train": 8, "val": 2, "test": 2}
    assert set().union(*(set(p.names) for p in pools.values())) == set(names)
    assert int(pools["train"].offsets[-1]) == 8 * 4
    batch = build_tasks(run.dataset).train.sample(2, torch.Generator().manual_seed(0))
    assert tuple(batch.support_x.shape) == (2, 2, 3, 16, 16)


def test_a_users_dataset_class_by_import_path_with_its_arguments(tmp_path, make_config):
    run = _config(
        make_config,
        "dataset.target=test_torchvision_data.ColourDots",
        "+dataset.kwargs.scale=2",
        f"dataset.root={tmp_path}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    )
    pools = torchvision_data.load_torchvision(run.dataset)
    assert sum(len(p.names) for p in pools.values()) == 12
    first = pools["train"].images[0]
    name = pools["train"].names[0]
    label = ColourDots.classes.index(name)
    assert int(first[0, 0, 0]) == 20 * label * 2 % 256  # kwargs reached the constructor


def test_an_unknown_class_and_missing_files_name_the_fix(tmp_path, make_config):
    with pytest.raises(ValueError, match="dataset.target='NoSuchSet' is not a dataset class"):
        torchvision_data.load_torchvision(_config(make_config, "dataset.target=NoSuchSet").dataset)
    run = _config(make_config, "dataset.target=Flowers102", f"dataset.root={tmp_path}")
    with pytest.raises(FileNotFoundError, match="dataset.download=true on a machine with network"):
        torchvision_data.load_torchvision(run.dataset)
