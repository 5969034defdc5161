"""``TorchComm``: the same ``Comm`` interface on real ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Each collective runs as its entry of the op table says (``Op.torch_call``, core/ops.py): the
tensor-native collective a production code base would use (``all_gather_single`` and
``reduce_scatter_single``, ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` before torch 2.13;
``all_reduce``, ``broadcast``, ``all_to_all_single``), through one generic ``_collective``;
point to point is ``isend``/``irecv``, and ``batch_isend_irecv`` for a ring shift.
The calls are recorded exactly as the simulator records them, so traces can be compared.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from ..core.comm import Comm
from ..core.ops import OPS
from ..core.trace import Recorder
from .call_log import CallLog

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

    def _collective(self, op, x, *params, async_op=False):
        """Collective ``op`` as its table entry runs it on torch.distributed (``OPS[op].torch_call``, ops.py),
        logged around the hand-over; ``async_op=True`` (from ``_post_collective``) returns a handle whose
        ``wait`` finishes the result."""
        with self._calling(op, x, params) as key:
            work, result = OPS[op].torch_call(self.pg, x, *params, async_op=async_op)
        if work is None or not async_op:
            return result()
        return _Pending(work, result, lambda: self._waiting(key))

    def _post_collective(self, op, x, *params):
        return self._collective(op, x, *params, async_op=True)

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
