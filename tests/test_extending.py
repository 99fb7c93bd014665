"""The worked example of docs/extending.md: an algorithm written outside metarun on its shared
parts (docs/examples/fo_reptile.py), loaded through $METARUN_PLUGINS and run by the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import cli_env, run_metarun

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"


def _metarun(args, tmp_path, plugins="fo_reptile"):
    env = cli_env(PYTHONPATH=str(EXAMPLES), METARUN_PLUGINS=plugins)
    search = f"hydra.searchpath=[file://{EXAMPLES / 'conf'}]"
    return run_metarun(["algo=fo_reptile", search, *args], tmp_path, env=env, timeout=240)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return state["algorithm"]


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_example_trains_evaluates_and_resumes_through_the_cli(tmp_path, tiny, batching):
    args = [*tiny, f"algo.task_batching={batching}"]
    whole = _metarun([*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert "test loss:" in whole.stdout and "95% CI" in whole.stdout
    # Interrupted after 3 of 6 steps, then resumed: the same weights as the run in one go.
    parts = tmp_path / "parts"
    first = _metarun([*args, "outer_steps=3", f"hydra.run.dir={parts}"], tmp_path)
    assert first.returncode == 0, first.stderr
    rest = _metarun([*args, "resume=true", f"hydra.run.dir={parts}"], tmp_path)
    assert rest.returncode == 0, rest.stderr
    a, b = _weights(tmp_path / "whole"), _weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_plugin_that_cannot_be_imported_is_a_usage_error(tmp_path):
    result = _metarun([], tmp_path, plugins="no_such_module_here")
    assert result.returncode == 2
    assert "error: METARUN_PLUGINS: cannot import 'no_such_module_here'" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_the_pull_it_is_first_order_maml(monkeypatch):
    """reptile_weight=0: the meta-gradient of built-in first-order MAML, on the same tasks."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from fo_reptile import FOReptile, FOReptileConfig

    from metarun.algorithms.maml import MAML
    from metarun.models.mlp import MLP
    from metarun.tasks import TaskBatch

    torch.manual_seed(0)
    model = MLP().double()
    batch = TaskBatch(*(torch.randn(3, 5, 1, dtype=torch.float64) for _ in range(4)))
    config = FOReptileConfig(inner_lr=0.1, inner_steps=2, eval_inner_steps=2, reptile_weight=0.0,
                             task_batching="loop")  # type: ignore[arg-type]  # fmt: skip
    ours = FOReptile(model, config, "regression")
    ours.meta_train_step(batch)
    reference = MAML(
        model, task_type="regression", inner_lr=0.1, inner_steps=2, eval_inner_steps=2,
        first_order=True,
    )  # fmt: skip
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference.meta_train_step(batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-14)
