"""The one place that gathers features across ranks.

Contrastive losses need every sample of the *global* batch as a negative, but each rank only
holds its own samples. We use the **local-loss form** (open_clip's ``local_loss=True,
gather_with_grad=True``):

- every rank gathers the features of all ranks, with gradient (:func:`gather_with_grad`);
- every rank computes only the loss *rows* of its own samples, against all gathered *columns*;
- the rank's loss is the mean over its local rows.

Why this is exact: let the global batch have ``M = W * m`` samples (``W`` ranks, ``m`` each) and
the single-process loss be ``L = (1/M) * sum_i l_i`` over all rows ``i``. Rank ``r`` computes
``L_r = (1/m) * sum_{i on r} l_i``, so ``mean_r L_r = L``. In backward, the all-gather sends the
gradient each rank computed for *another* rank's columns back to that rank and sums it there, so
rank ``r``'s parameters receive ``sum_r' dL_r'/dtheta`` through its own features. DDP (and
Accelerate, FSDP, DeepSpeed) then averages gradients over ranks: ``(1/W) sum_r' dL_r'/dtheta =
dL/dtheta``. Two processes with ``B`` pairs each therefore train exactly like one process with
``2B`` pairs. This needs every rank to hold the same number of samples (the mean over ranks is
only the global mean then), which :func:`gather_with_grad` checks.

Why not gather and compute the full matrix everywhere: the logits cost memory and compute
``O(m * M)`` per rank instead of ``O(M^2)``, which is what lets the batch grow with the number
of GPUs.

Losses never call ``torch.distributed`` themselves; they call :func:`world`,
:func:`gather_with_grad` and :func:`gather` (no gradient: per-sample ids such as the image groups
of the false-negative mask), which are the identity when no process group is initialised, so the
same loss code runs in a plain single-process test.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_shape(x: torch.Tensor, world_size: int) -> None:
    """Fail on every rank, with a clear message, when ranks hold different shapes.

    Without this check a mismatch hangs (NCCL) or fails deep inside the collective (gloo).
    One tiny all_gather of the shape; every rank sees the same sizes, so all raise together.
    """
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)  # (x.dim(),)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) == 1:
        return
    sizes = [s[0] for s in shapes]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"ranks hold different numbers of samples per batch: {sizes} (rank order). The "
            "contrastive losses gather features across ranks and need every rank to have the "
            "same number of pairs per batch: use a per-rank batch size that divides the data, "
            "drop the last partial batch, and give every rank equal batches per epoch."
        )
    raise ValueError(f"ranks hold features of different shapes: {shapes} (rank order)")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order, differentiable.

    ``x``: (m, ...) on every rank, the same shape everywhere (checked) -> (W * m, ...); rank
    ``r``'s rows are ``[r * m, (r + 1) * m)``. Backward sums every rank's gradient for rank
    ``r``'s rows and hands it to rank ``r``. Identity when not distributed.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    _check_same_shape(x, world_size)
    # torch.distributed.nn.functional.all_gather is the autograd-aware all_gather that works
    # on every backend (gloo included: its backward emulates reduce-scatter with scatters).
    # torch 2.14 marks it deprecated in favour of the private _functional_collectives API;
    # keep the warning out of training logs until that API is public.
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*nn\.functional\.all_gather is deprecated", category=FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order, without gradient.

    For per-sample metadata every rank needs for the whole global batch (integer image/group ids):
    ``x`` (m, ...) on every rank, the same shape everywhere (checked) -> (W * m, ...), rank ``r``'s
    rows at ``[r * m, (r + 1) * m)`` like :func:`gather_with_grad`. Identity when not distributed.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    _check_same_shape(x, world_size)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
