"""The Python API: :func:`load` a checkpoint as a :class:`Learner`, adapt it to a task, predict.

Example::

    import metarun

    learner = metarun.load("outputs/maml_omniglot/2024-01-01_12-00-00/checkpoints/best.pt")
    predict = learner.adapt(support_x, support_y)   # one task: (S, 1, 28, 28), (S,)
    logits = predict(query_x)                       # (Q, n_way)
    labels = logits.argmax(-1)

Raw images (PIL images, image files or their bytes, uint8 arrays) go through the preprocessing
of the checkpoint's dataset, the one its loader applies (Omniglot: grey, LANCZOS to 28x28,
inverted, scaled to [0, 1]); pass lists of them wherever tensors go::

    support = ["a/1.png", "b/1.png", "c/1.png", "d/1.png", "e/1.png"]  # one per character
    predict = learner.adapt(support, [0, 1, 2, 3, 4])
    labels = predict(["a/2.png", "c/7.png"]).argmax(-1)           # tensor([0, 2])
    x = learner.transform("a/2.png")                               # (1, 28, 28), as the loader
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.base import MetaAlgorithm
from metarun.config import RunConfig, options
from metarun.runner.build import build_experiment
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.resume import checkpoint_config

#: Model inputs: a tensor ``(N, *input_shape)`` as it is, or a sequence of raw images (anything
#: the dataset's ``transform`` takes: PIL images, paths, image bytes, uint8 arrays).
Inputs = Tensor | Sequence[Any]


class AdaptedModel:
    """The model adapted to one task: call it on query inputs to get outputs (logits for
    classification, predictions for regression).

    Attributes:
        params: the fast parameters, keyed like ``model.named_parameters()`` (detached).
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        params: dict[str, Tensor],
        device: torch.device,
        prepare: Callable[[Inputs], Tensor] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.params = params
        self.device = device
        self._prepare = prepare

    def __call__(self, query_x: Inputs) -> Tensor:
        """``(Q, *input_shape)``, or a sequence of ``Q`` raw images, ``-> (Q, num_outputs)``."""
        x = self._prepare(query_x) if self._prepare is not None else query_x
        if not isinstance(x, Tensor):
            raise TypeError(f"query_x must be a tensor, got {type(x).__name__}")
        with torch.no_grad():
            return self.algorithm.predict(self.params, x.to(self.device))


class Learner:
    """A meta-trained algorithm, loaded from a checkpoint by :func:`load`.

    Attributes:
        algorithm: the :class:`~metarun.algorithms.base.MetaAlgorithm` (an ``nn.Module``).
        config: the checkpoint's :class:`~metarun.config.RunConfig`.
        task_type: ``"classification"`` or ``"regression"``.
        step: outer steps the checkpoint was trained for.
    """

    def __init__(
        self,
        algorithm: MetaAlgorithm,
        config: RunConfig,
        task_type: str,
        step: int,
        device: torch.device,
    ) -> None:
        self.algorithm = algorithm
        self.config = config
        self.task_type = task_type
        self.step = step
        self.device = device

    @property
    def model(self) -> nn.Module:
        """The network with the meta-learned initial weights."""
        return self.algorithm.model

    def transform(self, image: Any) -> Tensor:
        """One raw image -> the model's input, prepared exactly as the checkpoint's data loader
        prepares its files (the dataset module's own ``transform``; Omniglot: grey, LANCZOS to
        ``dataset.image_size``, inverted to white strokes on black, scaled to ``[0, 1]``).

        Args:
            image: a PIL image, the path or bytes of an image file, or a uint8 array (numpy or
                torch) ``(H, W)`` or ``(H, W, channels)``, as drawn or photographed.

        Returns:
            ``(channels, image_size, image_size)`` float32 on the CPU.

        Raises:
            TypeError: the checkpoint's dataset has no image preprocessing (e.g. sinusoid:
                pass tensors), or ``image`` is of no type above.
        """
        dataset = self.config.dataset
        prepare = getattr(dataset, "transform", None)
        if prepare is None:
            name = registry.option_of("dataset", dataset).name
            raise TypeError(
                f"dataset={name} has no image preprocessing: pass its inputs as tensors"
            )
        out = prepare(image)
        if not isinstance(out, Tensor):
            raise TypeError(f"the dataset's transform returned {type(out).__name__}")
        return out

    def inputs(self, x: Inputs) -> Tensor:
        """Model inputs: a tensor, or a sequence of raw images through :meth:`transform`,
        stacked ``(N, *input_shape)``; contiguous either way, as a convolution's rounding
        depends on its input's memory layout (a slice of a channels-last pool is not)."""
        if isinstance(x, Tensor):
            return x.contiguous()
        if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
            raise TypeError(
                f"inputs must be a tensor or a list of images, got {type(x).__name__} (wrap "
                "one image in a list)"
            )
        return torch.stack([self.transform(image) for image in x])

    def adapt(
        self, support_x: Inputs, support_y: Tensor | Sequence[Any], steps: int | None = None
    ) -> AdaptedModel:
        """Adapt to one task (no task dimension) and return its predictor.

        Args:
            support_x: ``(S, *input_shape)`` support inputs, or a list of ``S`` raw images
                (prepared by :meth:`transform`).
            support_y: ``(S,)`` int64 labels in ``[0, n_way)`` or ``(S, 1)`` float targets (a
                list of ints is taken as labels).
            steps: inner steps; default ``algo.eval_inner_steps`` of the checkpoint.

        Returns:
            A callable ``predict(query_x) -> outputs``, ``query_x`` a tensor or a list of raw
            images.
        """
        x = self.inputs(support_x)
        y = support_y if isinstance(support_y, Tensor) else torch.as_tensor(support_y)
        # Adaptation takes gradients even if the caller is inside torch.no_grad().
        with torch.enable_grad():
            params = self.algorithm.adapt(x.to(self.device), y.to(self.device), steps)
        return AdaptedModel(
            self.algorithm,
            {k: v.detach() for k, v in params.items()},
            self.device,
            prepare=self.inputs,
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Learner({options(c)}, task_type={self.task_type!r}, step={self.step}, "
            f"device={self.device})"
        )


def load(path: str | Path, device: str | torch.device = "cpu") -> Learner:
    """Load a checkpoint written by ``metarun`` for adaptation and prediction.

    Args:
        path: a checkpoint, e.g. ``<run dir>/checkpoints/best.pt`` (or ``last.pt``).
        device: where to put the model.

    Returns:
        A :class:`Learner`; ``learner.adapt(support_x, support_y)(query_x)`` gives outputs.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``path`` is not a metarun checkpoint (:class:`ConfigError` if its config
            no longer validates).

    Example:
        >>> learner = metarun.load("outputs/maml_sinusoid/<time>/checkpoints/last.pt")
        >>> predict = learner.adapt(support_x, support_y, steps=10)  # (K, 1), (K, 1)
        >>> y_hat = predict(torch.linspace(-5, 5, 100).unsqueeze(-1))  # (100, 1)
    """
    device = torch.device(device)
    state = load_checkpoint(path, map_location=device)
    config = checkpoint_config(state)
    # Building initialises weights from the global RNG; leave the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        experiment = build_experiment(config, with_data=False, device=device, seed=False)
    experiment.algorithm.load_state_dict(state["algorithm"])
    return Learner(experiment.algorithm, config, experiment.task_type, int(state["step"]), device)
