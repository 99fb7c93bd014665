"""The inner loop's learning rates, fixed or meta-learned, shared by MAML and ANIL.

``learn_inner_lr``:

- ``off``: the fixed ``inner_lr``;
- ``scalar``: one learned rate;
- ``per_param``: Meta-SGD (Li et al. 2017), an elementwise rate for every adapted weight;
- ``per_layer_per_step``: MAML++'s LSLR (Antoniou et al. 2019), one rate per weight tensor and
  inner step (evaluation steps beyond the training steps use the last step's rates).

The learned rates are ``nn.Parameter`` s of the algorithm itself (attributes ``inner_lr``,
``inner_lrs``, ``step_lrs``: the names checkpoints have always used); :class:`InnerRates`
creates them and turns them into the ``hyper`` argument of :func:`metarun.unroll.inner_loop`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metarun.spec.enums import InnerLR


def param_key(name: str) -> str:
    """``ParameterDict`` keys may not contain dots."""
    return name.replace(".", "__")


class InnerRates:
    """Learned (or fixed) inner rates of the weights named in ``named``.

    Args:
        kind: the ``learn_inner_lr`` option.
        lr: the fixed rate, or the learned rates' initial value.
        named: the adapted weights, by the names their rates are stored under.
        steps: inner steps in training (``per_layer_per_step`` only).
    """

    def __init__(
        self, kind: InnerLR | str, lr: float, named: Mapping[str, Tensor], steps: int = 1
    ) -> None:
        self.kind = InnerLR(kind)
        self.base = float(lr)
        self.steps = steps
        self.inner_lr: nn.Parameter | None = None
        self.inner_lrs: nn.ParameterDict | None = None
        self.step_lrs: nn.ParameterDict | None = None
        if self.kind is InnerLR.scalar:
            self.inner_lr = nn.Parameter(torch.tensor(self.base))
        elif self.kind is InnerLR.per_param:
            self.inner_lrs = nn.ParameterDict(
                {
                    param_key(n): nn.Parameter(torch.full_like(p.detach(), self.base))
                    for n, p in named.items()
                }
            )
        elif self.kind is InnerLR.per_layer_per_step:
            self.step_lrs = nn.ParameterDict(
                {
                    param_key(n): nn.Parameter(
                        torch.full((steps,), self.base, dtype=p.dtype, device=p.device)
                    )
                    for n, p in named.items()
                }
            )

    def attach(self, owner: nn.Module) -> None:
        """Register the learned rates on ``owner`` under their checkpoint names."""
        for name in ("inner_lr", "inner_lrs", "step_lrs"):
            setattr(owner, name, getattr(self, name))

    def hyper(self, names: Mapping[str, str], step: int | None = None) -> dict[str, object]:
        """The ``hyper`` of an inner step: ``{"lr": ...}`` for the weights ``names`` (their
        names in the loop -> the names their rates are stored under); ``step``: the inner step
        (per-step rates), ``None`` for a whole loop. Empty: the optimizer's fixed rate."""
        if self.step_lrs is not None and step is not None:
            t = min(step, self.steps - 1)
            return {"lr": {n: self.step_lrs[param_key(k)][t] for n, k in names.items()}}
        if self.inner_lr is not None:
            return {"lr": self.inner_lr}
        if self.inner_lrs is not None:
            return {"lr": {n: self.inner_lrs[param_key(k)] for n, k in names.items()}}
        return {}

    def log_scalars(self) -> dict[str, float]:
        """Values and hypergradient norms under ``inner_lr/``."""
        out: dict[str, float] = {}
        if self.inner_lr is not None:
            out["inner_lr/value"] = float(self.inner_lr.detach())
            if self.inner_lr.grad is not None:
                out["inner_lr/hypergrad"] = float(self.inner_lr.grad)
        if self.inner_lrs is not None:
            sq = 0.0
            for key, p in self.inner_lrs.items():
                out[f"inner_lr/{key}"] = float(p.detach().mean())
                if p.grad is not None:
                    sq += float(p.grad.pow(2).sum())
            out["inner_lr/hypergrad_norm"] = sq**0.5
        if self.step_lrs is not None:
            rates = torch.stack([p.detach() for p in self.step_lrs.values()])  # (tensors, steps)
            for t, value in enumerate(rates.mean(0).tolist()):
                out[f"inner_lr/step{t}"] = value
            grads: list[Tensor] = [p.grad for p in self.step_lrs.values() if p.grad is not None]
            if grads:
                out["inner_lr/hypergrad_norm"] = float(torch.stack(grads).norm())
        return out
