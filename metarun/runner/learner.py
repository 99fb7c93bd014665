"""The Python API: :func:`load` a checkpoint as a :class:`Learner`, adapt it to a task, predict.

Example::

    import metarun

    learner = metarun.load("outputs/maml_omniglot/2024-01-01_12-00-00/checkpoints/best.pt")
    predict = learner.adapt(support_x, support_y)   # one task: (S, 1, 28, 28), (S,)
    logits = predict(query_x)                       # (Q, n_way)
    labels = logits.argmax(-1)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.config import RunConfig, options
from metarun.runner.build import build_experiment
from metarun.runner.checkpoint import load_checkpoint
from metarun.runner.resume import checkpoint_config


class AdaptedModel:
    """The model adapted to one task: call it on query inputs to get outputs (logits for
    classification, predictions for regression).

    Attributes:
        params: the fast parameters, keyed like ``model.named_parameters()`` (detached).
    """

    def __init__(
        self, algorithm: MetaAlgorithm, params: dict[str, Tensor], device: torch.device
    ) -> None:
        self.algorithm = algorithm
        self.params = params
        self.device = device

    def __call__(self, query_x: Tensor) -> Tensor:
        """``(Q, *input_shape) -> (Q, num_outputs)``."""
        with torch.no_grad():
            return self.algorithm.predict(self.params, query_x.to(self.device))


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

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> AdaptedModel:
        """Adapt to one task (no task dimension) and return its predictor.

        Args:
            support_x: ``(S, *input_shape)`` support inputs.
            support_y: ``(S,)`` int64 labels in ``[0, n_way)`` or ``(S, 1)`` float targets.
            steps: inner steps; default ``algo.eval_inner_steps`` of the checkpoint.

        Returns:
            A callable ``predict(query_x) -> outputs``.
        """
        # Adaptation takes gradients even if the caller is inside torch.no_grad().
        with torch.enable_grad():
            params = self.algorithm.adapt(
                support_x.to(self.device), support_y.to(self.device), steps
            )
        return AdaptedModel(self.algorithm, {k: v.detach() for k, v in params.items()}, self.device)

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
