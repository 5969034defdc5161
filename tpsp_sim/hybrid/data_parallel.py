"""The data-parallel step on a device mesh: reduce every gradient over the ranks that hold a replica of it.

On a mesh ("dp", "cp", "tp") a parameter's copies live on:

* every axis but "tp" — data parallelism replicates the model, and context parallelism does too (each
  cp rank runs the same weights on its part of the sequence; Megatron reduces over its DP×CP group);
* "tp" as well for parameters marked ``sequence_parallel`` (LayerNorms, row biases under SP): each tp
  rank saw only its tokens, so its gradient is a partial sum (``sync_sequence_parallel_grads``).

Sharded tensor-parallel gradients are already complete on their tp rank (the mappings' backward
collectives summed them), so they are reduced over the replica axes only.
"""

from __future__ import annotations

from torch import nn

from ..core.mesh import DeviceMesh
from ..tensor_parallel.grad_sync import all_reduce_bucket, sync_sequence_parallel_grads

TENSOR_AXIS = "tp"


def sync_gradients(module: nn.Module, mesh: DeviceMesh, op: str = "avg") -> None:
    """Reduce the gradients of ``module`` over the axes that replicate them: call after backward, before the step.

    Buckets: one per axis group, each the gradients it must reduce flattened and concatenated in
    ``module.parameters()`` order (one dtype; no size cap), so one all-reduce per group:

    1. over ``mesh["tp"]``, the ``sequence_parallel`` gradients, summed (partial sums of one replica);
    2. over the flattened other axes (``mesh["dp", "cp"]``), every gradient, with ``op``: "avg" when each
       replica's loss is a mean over its own tokens (the global mean is the mean of the replicas'),
       "sum" when each rank's loss is already divided by the global token count.

    Recorded with phase "grad_sync", under scopes "sp_grads" and "dp_grads". Axes of one rank are
    skipped. Afterwards ``ts.gather_dense_grads(module, mesh["tp"])`` is the dense model's gradient
    of the global loss.
    """
    if op not in ("avg", "sum"):
        raise ValueError(f"rank {mesh.comm.rank}: sync_gradients op must be 'avg' or 'sum', got {op!r}")
    if TENSOR_AXIS in mesh.mesh_dim_names and mesh.size(TENSOR_AXIS) > 1:
        sync_sequence_parallel_grads(module, mesh[TENSOR_AXIS])
    replicas = tuple(n for n in mesh.mesh_dim_names if n != TENSOR_AXIS)
    if not replicas or all(mesh.size(n) == 1 for n in replicas):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    dtypes = {g.dtype for g in grads}
    if len(dtypes) > 1:
        raise ValueError(f"rank {mesh.comm.rank}: sync_gradients buckets one dtype, got gradients of "
                         f"{sorted(map(str, dtypes))}")
    if not grads:
        return
    all_reduce_bucket(grads, mesh[replicas], "dp_grads", op)

