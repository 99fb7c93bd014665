"""``dataset=torchvision``: few-shot tasks from any labelled dataset class, by name.

``dataset.target`` names the class: a torchvision dataset (``Flowers102``, ``DTD``,
``FGVCAircraft``, ``EMNIST``, ``ImageFolder``, ... or ``torchvision.datasets.Flowers102``) or
your own ``torch.utils.data.Dataset`` by import path (``mypackage.data.MyDataset``, on
``PYTHONPATH``). Each item must be ``(image, label)`` with a PIL image (or a uint8 array) and an
integer label. It is constructed with ``root=dataset.root``, ``download=dataset.download`` (for
classes that take it) and ``dataset.kwargs``; with ``dataset.split_arg`` (e.g. ``split``) once
per value in ``dataset.parts`` (e.g. ``[train, val, test]``), and the parts merged: a few-shot
split is by class, so the dataset's own image splits are pooled and its classes are cut by
``dataset.split_fractions`` with ``dataset.split_seed``. Images are decoded once to RGB (or grey,
``dataset.channels=1``; inverted with ``dataset.invert=true``) at ``dataset.image_size`` into the
uint8 cache.

    metarun dataset=torchvision dataset.target=Flowers102 dataset.root=$HOME/data \\
        dataset.download=true dataset.split_arg=split 'dataset.parts=[train,val,test]'
"""

from __future__ import annotations

import importlib
import inspect
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from metarun.data.image_folder import (
    OwnImagesConfig,
    cached_own_pools,
    cut_classes,
    own_task_sources,
)
from metarun.data.images import SPLITS, ClassPool
from metarun.registry import register
from metarun.spec.checks import require
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

#: Seconds a download may wait on the network before failing (offline: a clear error, no hang).
DOWNLOAD_TIMEOUT = 30.0


@dataclass
class TorchvisionConfig(OwnImagesConfig):
    """``dataset=torchvision``: a labelled dataset class turned into class pools."""

    root: str = "${oc.env:METARUN_DATA,data}/torchvision"
    target: str = "ImageFolder"
    download: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    split_arg: str | None = None
    parts: list[str] = field(default_factory=list)

    option: ClassVar[str] = "torchvision"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            bool(self.target.strip()),
            "dataset.target",
            self.target,
            "a dataset class (e.g. Flowers102, or mypackage.MyDataset)",
            "dataset.target=Flowers102",
        )
        require(
            not self.parts or self.split_arg is not None,
            "dataset.parts",
            list(self.parts),
            "empty unless dataset.split_arg names the constructor's split argument",
            "dataset.split_arg=split",
        )


def dataset_class(target: str) -> Callable[..., Any]:
    """The class ``target`` names: a torchvision dataset by its name, or any class by its
    import path.

    Raises:
        ValueError: no such class (naming ``dataset.target`` and the fix).
    """
    module_name, _, name = target.rpartition(".")
    candidates = [(module_name, name)] if module_name else [("torchvision.datasets", name)]
    for module, attr in candidates:
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if callable(found):
            return found  # type: ignore[no-any-return]
    raise ValueError(
        f"dataset.target={target!r} is not a dataset class: neither a torchvision.datasets "
        "class nor an importable module.Class. Fix: e.g. dataset.target=Flowers102, or put "
        "your module on PYTHONPATH and set dataset.target=mypackage.data.MyDataset"
    )


def _construct(cls: Callable[..., Any], config: TorchvisionConfig, part: str | None) -> Any:
    try:
        params: Mapping[str, Any] = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = dict(config.kwargs)
    if "root" in params and "root" not in kwargs:
        kwargs["root"] = config.root
    if "download" in params:
        kwargs["download"] = config.download
    if part is not None and config.split_arg is not None:
        kwargs[config.split_arg] = part
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return cls(**kwargs)
    except (OSError, RuntimeError) as error:
        raise FileNotFoundError(
            f"dataset.target={config.target} could not be loaded from dataset.root="
            f"{config.root!r} ({type(error).__name__}: {error}). Fix: put its files there, or "
            "set dataset.download=true on a machine with network"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _labels(data: Any) -> list[int]:
    """Every item's label, from the dataset's label list when it has one (no image decoded)."""
    for attr in ("targets", "_labels", "labels", "_targets"):
        values = getattr(data, attr, None)
        if values is not None and len(values) == len(data):
            return [int(v) for v in values]
    return [int(data[i][1]) for i in range(len(data))]


def _image_of(data: Any, index: int) -> Callable[[], Any]:
    def read() -> Any:
        return data[index][0]

    read.__name__ = f"{type(data).__name__}[{index}]"
    return read


def load_torchvision(config: TorchvisionConfig) -> dict[str, ClassPool]:
    """The class pools of each split of ``dataset.target``, decoded once and cached."""
    cls = dataset_class(config.target)
    by_class: dict[str, list[Callable[[], Any]]] = {}
    sizes = []
    parts: list[str | None] = list(config.parts) or [None]
    for part in parts:
        data = _construct(cls, config, part)
        names = list(getattr(data, "classes", []) or [])
        labels = _labels(data)
        sizes.append(len(labels))
        for index, label in enumerate(labels):
            name = str(names[label]) if label < len(names) else str(label)
            by_class.setdefault(name, []).append(_image_of(data, index))
    cuts = cut_classes(
        sorted(by_class), list(config.split_fractions), config.split_seed, config.test_only
    )
    splits = {s: {n: by_class[n] for n in cuts[s]} for s in SPLITS}
    key = (
        f"{config.target}|{config.root}|{sorted(config.kwargs.items())}|{config.parts}|"
        f"{sizes}|{[list(splits[s]) for s in SPLITS]}"
    )
    return cached_own_pools(config, "torchvision", key, splits)


@register("dataset", "torchvision", TorchvisionConfig)
def build_torchvision(config: TorchvisionConfig) -> TaskSources:
    return own_task_sources(config, load_torchvision(config))
