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
