"""Several processes (CPUs or GPUs) meta-training one model with ``torch.distributed``.

Every rank samples the same full meta-batch from the same generator and keeps its slice, so a
run with ``N`` processes sees exactly the tasks of a single-process run. Each rank computes the
meta-gradient of its tasks; the gradients are then averaged with an explicit all-reduce.
(``DistributedDataParallel`` cannot do this here: its hooks fire on the module's parameters,
but MAML's forward runs through ``torch.func.functional_call`` with substituted fast weights.)
Only rank 0 logs, writes TensorBoard and checkpoints; all ranks share rank 0's run dir.

Start with ``torchrun --nproc_per_node=N -m metarun.cli ...`` (environment variables), or under
SLURM/submitit with several tasks per node (``SLURM_*`` variables, via submitit's helper).
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from metarun.config import ConfigError
from metarun.parallel import Shards

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size == 1`` means no ``torch.distributed`` at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def _from_slurm() -> bool:
    """Exports torchrun-style variables from SLURM's (submitit's helper); False if not SLURM."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "RANK" in os.environ:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as error:
        raise ConfigError(
            "a multi-task SLURM job needs submitit to set up torch.distributed, got "
            f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} without it (pip install "
            "'metarun[cluster]', or start the processes with torchrun)"
        ) from error
    # overwrite: a MASTER_PORT the user exported (to keep jobs sharing a node apart) is still
    # the one used, since submitit reads it first, but without this it refuses to export at all.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


def setup(device: torch.device) -> DistContext:
    """Joins the process group described by the environment (no-op for a single process).

    Args:
        device: the device the run would use; on CUDA each rank takes ``cuda:<local_rank>``.

    Returns:
        The context; ``ctx.enabled`` is False for a plain single-process run.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _local_rank())
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local = _local_rank()
    if device.type == "cuda":
        torch.cuda.set_device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    logger.info("torch.distributed: rank %d of %d (%s)", rank, world, backend)
    return DistContext(rank, world, local)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(n_tasks: int, ctx: DistContext) -> slice:
    """This rank's tasks of a meta-batch of ``n_tasks`` (equal shares)."""
    if n_tasks % ctx.world_size:
        fix = ctx.world_size * max(1, n_tasks // ctx.world_size)
        raise ConfigError(
            f"meta_batch_size must be divisible by the number of processes ({ctx.world_size}), "
            f"got {n_tasks} (set e.g. meta_batch_size={fix})"
        )
    share = n_tasks // ctx.world_size
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


def example_shards(dataset: Any, ctx: DistContext) -> Shards:
    """Data parallelism over each step's examples (``algo=l2rw`` / ``erm``): checks that the
    training and clean batches split evenly, and gives the algorithm its share and an
    all-reduce."""
    for key, n in dataset.shard_sizes().items():
        if n % ctx.world_size:
            fix = ctx.world_size * max(1, n // ctx.world_size)
            raise ConfigError(
                f"{key} must be divisible by the number of processes ({ctx.world_size}), got "
                f"{n} (set e.g. {key}={fix})"
            )
    return Shards(ctx.rank, ctx.world_size, _all_reduce_sum)


def _all_reduce_sum(t: torch.Tensor) -> None:
    dist.all_reduce(t)


def average_gradients(params: Iterable[torch.Tensor], ctx: DistContext) -> None:
    """Replaces each ``.grad`` by its mean over ranks (one flat all-reduce).

    Every rank runs the same code on same-shaped tasks, so the set of parameters that have a
    gradient is the same everywhere.
    """
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    shards = Shards(ctx.rank, ctx.world_size, _all_reduce_sum)
    for g, mean in zip(grads, shards.mean(grads)):
        g.copy_(mean)


def average_metrics(
    metrics: Mapping[str, float | torch.Tensor], ctx: DistContext, device: torch.device
) -> dict[str, float | torch.Tensor]:
    """Means over ranks of the per-rank metrics (same keys on every rank), as 0-d tensors on
    ``device``: the all-reduce needs no host read, and the runner reads them when it logs."""
    if not ctx.enabled or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.stack(
        [torch.as_tensor(metrics[k], dtype=torch.float64, device=device).detach() for k in keys]
    )
    dist.all_reduce(values)
    values /= ctx.world_size
    return dict(zip(keys, values.unbind()))


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (a stop signal must stop every rank at the same step)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run dir)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
