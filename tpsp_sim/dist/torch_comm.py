"""``TorchComm``: the same ``Comm`` interface on real ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Each method maps onto the tensor-native collective a production code base would use:
``all_gather_single`` and ``reduce_scatter_single`` (``all_gather_into_tensor`` and
``reduce_scatter_tensor`` before torch 2.13), ``all_reduce``, ``broadcast``, ``all_to_all_single``,
``isend``/``irecv``, and ``batch_isend_irecv`` for a ring shift.
The calls are recorded exactly as the simulator records them, so traces can be compared.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from ..core.comm import Comm
from ..core.ops import REDUCE_OPS
from ..core.trace import Recorder
from .call_log import CallLog

# torch 2.13 renamed these two (the old names warn FutureWarning); older torch has only the old names
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

_OPS = {op: getattr(dist.ReduceOp, member) for op, member in REDUCE_OPS.items()}


class TorchComm(Comm):
    """One process's communicator over a ``torch.distributed`` process group.

    ``calls`` (set by ``ts.run``'s workers) logs every call before it reaches the backend, so the
    parent can name mismatched calls and stalled ranks (call_log.py).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, recorder: Recorder | None = None,
                 device: torch.device | None = None, calls: CallLog | None = None) -> None:
        self.pg = group if group is not None else dist.group.WORLD
        ranks = tuple(dist.get_process_group_ranks(self.pg))
        super().__init__(dist.get_rank(self.pg), ranks, recorder or Recorder(dist.get_rank()))
        self.backend = dist.get_backend(self.pg)
        self._device = device or torch.device("cpu")
        self._calls = calls

    @property
    def device(self) -> torch.device:
        return self._device

    def _calling(self, op: str, x: torch.Tensor | None, params: tuple = (), pair: tuple[int, int] | None = None):
        """Log ``op`` (if this comm has a call log) around the block that hands it to torch.distributed."""
        if self._calls is None:
            return nullcontext()
        return self._calls.calling(op, x, params, self.group, self.current_scope, pair)

    def _waiting(self, *keys: list | None):
        """Log that the block waits for the sends or receives ``keys`` (their call log keys) and mark a
        failure inside it as caused by communication."""
        return nullcontext() if self._calls is None else self._calls.waiting(list(keys))

    # Each collective takes ``async_op`` (``_post_collective`` passes True): with it, torch's own
    # async_op=True work is returned in a handle whose ``wait`` finishes the result.

    def _all_gather(self, x, dim, async_op=False):
        with self._calling("all_gather", x, (dim,)) as key:
            x = x.detach().movedim(dim, 0).contiguous()
            out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
            work = _all_gather_single(out, x, group=self.pg, async_op=async_op)
        return self._result(work, key, lambda: out.movedim(0, dim).contiguous())

    def _all_reduce(self, x, op, async_op=False):
        out = x.detach().clone()
        with self._calling("all_reduce", x, (op,)) as key:
            work = dist.all_reduce(out, op=_OPS["sum" if op == "avg" else op], group=self.pg, async_op=async_op)
        # gloo has no AVG; sum, then divide as the simulator
        return self._result(work, key, lambda: out / self.world_size if op == "avg" else out)

    def _reduce_scatter(self, x, dim, op, async_op=False):
        with self._calling("reduce_scatter", x, (dim, op)) as key:
            x = x.detach().movedim(dim, 0).contiguous()
            out = x.new_empty((x.shape[0] // self.world_size, *x.shape[1:]))
            work = _reduce_scatter_single(out, x, op=_OPS["sum" if op == "avg" else op], group=self.pg,
                                          async_op=async_op)

        def result():
            moved = out.movedim(0, dim).contiguous()
            return moved / self.world_size if op == "avg" else moved
        return self._result(work, key, result)

    def _broadcast(self, x, src, async_op=False):
        out = x.detach().clone()
        with self._calling("broadcast", x, (src,)) as key:
            work = dist.broadcast(out, src=self.group[src], group=self.pg, async_op=async_op)
        return self._result(work, key, lambda: out)

    def _all_to_all(self, x, scatter_dim, gather_dim, async_op=False):
        p = self.world_size
        pieces = torch.stack(x.detach().chunk(p, scatter_dim)).contiguous()  # pieces[j] goes to rank j
        out = torch.empty_like(pieces)
        with self._calling("all_to_all", x, (scatter_dim, gather_dim)) as key:
            work = dist.all_to_all_single(out, pieces, group=self.pg, async_op=async_op)
        return self._result(work, key, lambda: torch.cat(out.unbind(0), gather_dim))

    def _post_collective(self, op, x, *params):
        return getattr(self, "_" + op)(x, *params, async_op=True)

    def _result(self, work, key, result):
        """The result now (a blocking call: ``work`` is None), or a handle whose ``wait`` logs that it waits
        for call ``key`` and finishes it."""
        if work is None:
            return result()
        return _Pending(work, result, lambda: self._waiting(key))

    def _barrier(self):
        with self._calling("barrier", None):
            dist.barrier(group=self.pg)

    def _isend(self, x, dst):
        pair = (self.global_rank, self.group[dst])
        with self._calling("send", x, (dst,), pair) as key:
            work = dist.isend(x.detach().contiguous(), dst=self.group[dst], group=self.pg)
        return _Pending(work, lambda: None, lambda: self._waiting(key))

    def _irecv(self, like, src):
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        with self._calling("recv", like, (src,), (self.group[src], self.global_rank)) as key:
            work = dist.irecv(out, src=self.group[src], group=self.pg)
        return _Pending(work, lambda: out, lambda: self._waiting(key))

    def _sendrecv(self, x, dst, src):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        ops = [dist.P2POp(dist.isend, x.detach().contiguous(), self.group[dst], self.pg),
               dist.P2POp(dist.irecv, out, self.group[src], self.pg)]
        with self._calling("send", x, (dst,), (self.global_rank, self.group[dst])) as send, \
                self._calling("recv", x, (src,), (self.group[src], self.global_rank)) as recv:
            works = dist.batch_isend_irecv(ops)
            with self._waiting(send, recv):
                for work in works:
                    work.wait()
        return out

    def _new_group(self, ranks):
        if self.world_size != dist.get_world_size():  # torch.distributed needs every process in new_group
            raise ValueError(f"rank {self.rank}: on {self.backend}, call new_group on the world communicator "
                             f"(this one spans {self.world_size} of {dist.get_world_size()} processes)")
        with self._calling("new_group", None, (list(ranks),)):
            pg = dist.new_group([self.group[r] for r in ranks])
        if self.rank not in ranks:
            return None
        return TorchComm(pg, self.recorder, self._device, self._calls)


class _Pending:
    """An isend's, irecv's or async collective's work handle; ``wait`` hands back ``result()`` (the buffer
    the call filled, None for a send) once torch's work is done."""

    def __init__(self, work, result: Callable[[], torch.Tensor | None], waiting) -> None:
        self.work, self.result, self._waiting = work, result, waiting

    def wait(self) -> torch.Tensor | None:
        with self._waiting():
            self.work.wait()
        return self.result()
