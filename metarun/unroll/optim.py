"""higher's module name for the differentiable optimizers: ``higher.optim.X`` keeps working with
``import metarun.unroll as higher``. The code lives in :mod:`metarun.unroll.diffopt` (the
higher-compatible layer); the pure update rules in :mod:`metarun.unroll.optimizers`."""

from __future__ import annotations

from metarun.unroll.diffopt import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
    DifferentiableASGD,
    DifferentiableNAdam,
    DifferentiableOptimizer,
    DifferentiableRAdam,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableSGD,
    GradCallback,
    Override,
    apply_trainable_opt_params,
    create_diff_optim,
    get_diff_optim,
    get_trainable_opt_params,
    register_optim,
)

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "GradCallback",
    "Override",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]
