"""compile=true: torch.compile where it works, the same numbers eagerly where it fails."""

from __future__ import annotations

import logging

import pytest
import torch

from metarun.algorithms.compiled import CompiledOrEager, check_backend


def _meta_loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # A second-order inner step under vmap, with a relu (the testing backend below fails on it).
    def task(xi: torch.Tensor) -> torch.Tensor:
        def inner(v: torch.Tensor) -> torch.Tensor:
            return torch.relu(xi @ v).pow(2).mean()

        fast = w - 0.1 * torch.func.grad(inner)(w)
        return torch.relu(xi @ fast).pow(2).mean()

    return torch.func.vmap(task)(x).mean()


def _value_and_grad(fn) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    loss = fn(w, x)
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


def test_compiled_meta_gradient_equals_eager() -> None:
    torch._dynamo.reset()
    compiled = CompiledOrEager(_meta_loss, "the test's meta-loss", backend="aot_eager")
    loss, grad = _value_and_grad(compiled)
    ref_loss, ref_grad = _value_and_grad(_meta_loss)
    assert compiled.failed is None and compiled.compiled is not None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_failed_compilation_warns_once_and_runs_eagerly(caplog) -> None:
    torch._dynamo.reset()
    compiled = CompiledOrEager(
        _meta_loss, "the test's meta-loss", backend="relu_compile_error_TESTING_ONLY"
    )
    with caplog.at_level(logging.WARNING, logger="metarun.algorithms.compiled"):
        loss, grad = _value_and_grad(compiled)
        again, _ = _value_and_grad(compiled)
    ref_loss, ref_grad = _value_and_grad(_meta_loss)
    assert compiled.failed is not None and compiled.compiled is None
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1
    assert "compile=false" in warnings[0].getMessage()
    assert torch.equal(loss, ref_loss) and torch.equal(again, ref_loss)
    assert torch.equal(grad, ref_grad)


def test_unknown_backend_names_the_key() -> None:
    check_backend("inductor")
    with pytest.raises(ValueError, match="compile_backend='nope'.*inductor"):
        check_backend("nope")


# ------------------------------------------------------------------------------ through the run


def _final_weights(run_dir) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from metarun.runner.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["algorithm"]


def test_compiled_run_trains_as_the_eager_run(make_config, tiny, tmp_path, caplog) -> None:
    from metarun.runner import api

    torch._dynamo.reset()
    common = [*tiny, "algo.task_batching=vmap"]
    eager_args = [*common, "compile=false"]
    api.run(make_config(eager_args), tmp_path / "eager", overrides=eager_args)
    compiled_args = [*common, "compile=true", "compile_backend=aot_eager"]
    with caplog.at_level(logging.WARNING):
        api.run(make_config(compiled_args), tmp_path / "compiled", overrides=compiled_args)
    fallbacks = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "compile" in r.getMessage()
    ]
    assert not fallbacks
    eager, compiled = _final_weights(tmp_path / "eager"), _final_weights(tmp_path / "compiled")
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides", [["algo.task_batching=loop"], ["algo=anil"]], ids=["maml-loop", "anil"]
)
def test_compile_without_a_compiled_path_says_the_run_is_eager(
    make_config, tiny, caplog, overrides
):
    from metarun.runner.build import build_experiment

    config = make_config([*tiny, "compile=true", *overrides])
    with caplog.at_level(logging.WARNING, logger="metarun.runner.build"):
        build_experiment(config, with_data=False)
    assert any("no compiled path" in r.getMessage() for r in caplog.records)


def test_cli_unknown_backend_is_a_usage_error(tmp_path, monkeypatch, capsys) -> None:
    import sys

    from metarun import cli

    args = ["outer_steps=1", "compile=true", "compile_backend=nope", "log.progress=false"]
    monkeypatch.setattr(sys, "argv", ["metarun", *args, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "compile_backend='nope'" in err
