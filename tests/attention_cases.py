"""Shared by the attention tests: inputs, the dense reference, and a sharded run brought back to full tensors."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tpsp_sim as ts


def make_qkv(b: int, heads: int, kv_heads: int, s: int, d: int, dtype=torch.float64, seed: int = 0):
    """q, k, v and an upstream gradient dout, drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda h: torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype)
    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def dense_grads(q, k, v, dout, causal: bool):
    """(out, dq, dk, dv) of dense SDPA."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = ts.dense_attention(q, k, v, causal=causal)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


class LargestTensor(TorchDispatchMode):
    """Meter: the most elements of any tensor an op produced on this thread (this rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _per_rank(comm, q, k, v, dout, attn, causal, meter, kwargs):
    layout = kwargs.get("layout", "contiguous")
    shard = lambda x: ts.shard_sequence(x, comm.rank, comm.world_size, dim=2, layout=layout)
    q, k, v = (shard(x).requires_grad_() for x in (q, k, v))
    largest = LargestTensor() if meter else None
    with largest or contextlib.nullcontext():
        out = attn(q, k, v, comm, causal=causal, **kwargs)
        out.backward(shard(dout))
    return out.detach(), q.grad, k.grad, v.grad, largest.numel if meter else None


def sharded_grads(attn, q, k, v, dout, world_size: int, *, causal: bool, meter: bool = False, backend: str = "sim",
                  **kwargs):
    """Run ``attn(q, k, v, comm, causal=causal, **kwargs)`` (ring or Ulysses) on sequence shards of the
    ``layout`` in kwargs; return ((out, dq, dk, dv) unsharded, RunResult).

    With ``meter``, ``res.outputs[r][4]`` is rank r's ``LargestTensor`` reading over forward and backward.
    """
    res = ts.run(_per_rank, q, k, v, dout, attn, causal, meter, kwargs, world_size=world_size, backend=backend)
    layout = kwargs.get("layout", "contiguous")
    full = tuple(ts.unshard_sequence([o[i] for o in res.outputs], dim=2, layout=layout) for i in range(4))
    return full, res


def max_error(got, want) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))
