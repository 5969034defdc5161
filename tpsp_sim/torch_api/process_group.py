"""``CommProcessGroup``: a ``torch.distributed.ProcessGroup`` written in Python over one rank's ``Comm``.

Every ``dist.*`` call, functional collective, DTensor redistribution and FSDP2 all-gather or
reduce-scatter ends in one of the methods below (c10d calls them from Python, and from C++ through
pybind's trampoline, ``PyProcessGroup``). Each hands the tensors to the ``Comm``'s collective, which
checks the arguments, records the call (op, bytes, scope, phase, and the mesh axis from the group's
description, ``"mesh_tp"`` → ``"tp"``) and runs it — on the simulator with its deadlock and
mismatch detection, or on real torch.distributed through ``TorchComm``. The result is copied into
the caller's output tensor as c10d's in-place signatures require (``detach`` hides the copy from
autograd, as torch's own threaded group does).

Work handles. A blocking call (c10d's options say ``asyncOp=False``) completes inside the call and
returns a completed ``Work``. With ``async_op=True``, and for the functional collectives (DTensor's,
FSDP2's; C++ passes them ``asyncOp=True`` or no options at all), each collective is posted to the
``Comm`` with ``async_op=True`` (recorded non-blocking) and a pending ``Work`` comes back: its ``wait``
(or ``wait_tensor`` on an ``AsyncCollectiveTensor``) is where the rank waits, records the
``WaitMark`` and fills the caller's output tensors, which hold their old values until then (on NCCL
they are undefined until then). ``isend`` / ``irecv`` are asynchronous the same way: their handle's
``wait`` completes the ``Comm``'s handle. ``dist.send`` is ``isend(...).wait()`` in c10d, so its event
is recorded non-blocking, followed by its wait.

``scatter`` and ``gather`` (``distribute_tensor`` scatters from rank 0) are the root's sends and
the other ranks' receives, as gloo runs them.

Not supported (a ``NotImplementedError`` naming the call): ``reduce``,
``recv_anysource``, ``monitored_barrier``, uneven ``all_to_all_single`` splits, point-to-point tags,
and the reduce ops the ``Comm`` has not (``BAND``, ``BOR``, ``BXOR``, ``PREMUL_SUM``: a ``ValueError``).
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from ..core.comm import Comm
from ..core.errors import SimulationError
from ..core.ops import REDUCE_OPS

_OPS = {getattr(dist.ReduceOp, member): name for name, member in REDUCE_OPS.items()}


def _done(result: Any) -> dist.Work:
    """A completed work handle (the collective finished inside the call)."""
    future: Future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _fill(out: torch.Tensor, value: torch.Tensor) -> None:
    out.detach().copy_(value.reshape(out.shape))


def _asynchronous(opts: Any) -> bool:
    """Whether c10d asked for the call in the background: ``async_op`` in the options (set by every dist.*
    call); no options at all come from the functional collectives' C++ (c10d's default is ``asyncOp=True``)."""
    return True if opts is None else bool(getattr(opts, "asyncOp", True))


class _Posted(dist.Work):
    """The handle of collectives posted with async_op=True: ``wait`` waits for each Comm handle in turn and
    fills the caller's outputs with its result."""

    def __init__(self, posted: list[tuple[Any, Callable[[Any], None]]], result: Any) -> None:
        super().__init__()
        self.posted, self.result, self.done = posted, result, False

    def wait(self, timeout: Any = None) -> bool:
        if not self.done:
            for handle, fill in self.posted:
                fill(handle.wait())
            self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done

    def get_future(self) -> Future:
        self.wait()
        future: Future = Future()
        future.set_result(self.result)
        return future


class _PointToPoint(dist.Work):
    """An isend's or irecv's handle: ``wait`` completes the Comm's handle (and fills the receive buffer)."""

    def __init__(self, handle: Any, out: torch.Tensor | None) -> None:
        super().__init__()
        self.handle, self.out = handle, out

    def wait(self, timeout: Any = None) -> bool:
        got = self.handle.wait()
        if self.out is not None:
            _fill(self.out, got)
        return True

    def is_completed(self) -> bool:
        return self.handle._done

    def get_future(self) -> Future:
        self.wait()
        future: Future = Future()
        future.set_result([] if self.out is None else [self.out])
        return future


class CommProcessGroup(dist.ProcessGroup):
    """One rank's torch.distributed process group over a ``Comm`` (its ranks are the group's ranks)."""

    def __init__(self, comm: Comm) -> None:
        super().__init__(comm.rank, comm.world_size)
        self._comm, self._owner = comm, threading.get_ident()
        self._name, self._desc = "", "undefined"

    @property
    def comm(self) -> Comm:
        """The rank's Comm; only its own thread may use it (virtual ranks share one process)."""
        if threading.get_ident() != self._owner:
            raise SimulationError(f"a process group of rank {self._comm.global_rank} (group {self._comm.group}) "
                                  f"was used from another thread: each rank must use its own groups, made inside "
                                  f"its fn (dist.new_group, init_device_mesh), never one kept from another rank or "
                                  f"a finished run")
        return self._comm

    def __repr__(self) -> str:
        return f"CommProcessGroup(rank={self._comm.rank}, size={self._comm.world_size}, group={self._comm.group})"

    def getBackendName(self) -> str:  # noqa: N802 - c10d's name
        return "tpsp_sim"

    # c10d sets these from Python; the C++ fields behind them are not reachable from a Python subclass
    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_name(self, name: str) -> None:
        self._name = name

    @property
    def group_desc(self) -> str:
        return self._desc

    def _set_group_desc(self, desc: str) -> None:
        """DeviceMesh names its groups ``mesh_<dim>``: record that dim as the calls' ``axis``."""
        self._desc = desc
        if desc.startswith("mesh_") and desc != "mesh_default":
            self._comm.axis = desc[len("mesh_"):]

    def shutdown(self) -> None:
        pass

    def abort(self) -> None:
        pass

    # ---- checks ---------------------------------------------------------------------------------

    def _reduce_op(self, opts: Any, op: str) -> str:
        reduce_op = opts.reduceOp.op if isinstance(opts.reduceOp, dist.ReduceOp) else opts.reduceOp
        if reduce_op not in _OPS:
            raise ValueError(f"rank {self.comm.rank} of group {self.comm.group}: {op} got ReduceOp."
                             f"{getattr(reduce_op, 'name', reduce_op)}, which the tpsp_sim backend does not "
                             f"support; supported: {', '.join('ReduceOp.' + m for m in REDUCE_OPS.values())}")
        return _OPS[reduce_op]

    def _unsupported(self, op: str, why: str = "") -> NotImplementedError:
        return NotImplementedError(
            f"rank {self.comm.rank} of group {self.comm.group}: {op} is not supported by the tpsp_sim backend"
            f"{why}; it supports all_reduce, all_gather, all_gather_into_tensor, reduce_scatter, "
            f"reduce_scatter_tensor, all_to_all, all_to_all_single, broadcast, barrier, send, recv, isend, "
            f"irecv, batch_isend_irecv, scatter, gather, new_group")

    def _sizes(self, op: str, output: torch.Tensor, x: torch.Tensor, ok: bool) -> None:
        """A ValueError unless ``ok`` (the sizes fit) and output and input have one dtype (never a silent cast)."""
        if not ok or output.dtype != x.dtype:
            raise ValueError(f"rank {self.comm.rank} of group {self.comm.group}: {op} got an output of shape "
                             f"{tuple(output.shape)} ({output.dtype}) for an input of shape {tuple(x.shape)} "
                             f"({x.dtype}) on {self.comm.world_size} ranks")

    def _pieces(self, op: str, pieces: Sequence[torch.Tensor], role: str, x: torch.Tensor, x_role: str) -> None:
        """A ValueError unless ``pieces`` (a list argument) holds one tensor per rank, each of ``x``'s size and dtype
        (c10d leaves this check to the backend; unchecked, ``zip`` would drop the missing ranks silently)."""
        if len(pieces) != self.comm.world_size or any(t.numel() != x.numel() or t.dtype != x.dtype for t in pieces):
            raise ValueError(f"rank {self.comm.rank} of group {self.comm.group}: {op} got {len(pieces)} {role} "
                             f"tensor(s) of shapes {[tuple(t.shape) for t in pieces]} "
                             f"({', '.join(sorted({str(t.dtype) for t in pieces}))}); with {x_role} of shape "
                             f"{tuple(x.shape)} ({x.dtype}) on {self.comm.world_size} ranks it needs "
                             f"{self.comm.world_size} {role} tensors of that size and dtype")

    # ---- collectives ----------------------------------------------------------------------------

    def _run(self, opts: Any, calls: list[tuple[Callable[..., Any], Callable[[Any], None]]], result: Any) -> dist.Work:
        """Each (call, fill): ``call(async_op=...)`` runs one Comm collective, ``fill`` copies its result into the
        caller's outputs. Blocking: filled now, a completed handle returned; asynchronous (``_asynchronous``):
        every call posted now, filled at the returned handle's ``wait``."""
        if not _asynchronous(opts):
            for call, fill in calls:
                fill(call())
            return _done(result)
        return _Posted([(call(async_op=True), fill) for call, fill in calls], result)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        op = self._reduce_op(opts or dist.AllreduceOptions(), "all_reduce")
        return self._run(opts, [(partial(self.comm.all_reduce, t, op), partial(_fill, t)) for t in tensors], tensors)

    allreduce_coalesced = allreduce

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        root = (opts or dist.BroadcastOptions()).rootRank
        return self._run(opts, [(partial(self.comm.broadcast, t, root), partial(_fill, t)) for t in tensors], tensors)

    def barrier(self, opts: Any = None) -> dist.Work:
        self.comm.barrier()
        return _done(None)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        def fill(outs: list[torch.Tensor], gathered: torch.Tensor) -> None:
            for out, piece in zip(outs, gathered.chunk(self.comm.world_size)):
                _fill(out, piece)
        for outs, x in zip(outputs, inputs):
            self._pieces("all_gather", outs, "output", x, "an input")
        return self._run(opts, [(partial(self.comm.all_gather, x if x.dim() else x.reshape(1), 0), partial(fill, outs))
                                for outs, x in zip(outputs, inputs)], outputs)

    def all_gather_single(self, output: torch.Tensor, x: torch.Tensor, opts: Any = None) -> dist.Work:
        self._sizes("all_gather_into_tensor", output, x, output.numel() == x.numel() * self.comm.world_size)
        return self._run(opts, [(partial(self.comm.all_gather, x if x.dim() else x.reshape(1), 0),
                                 partial(_fill, output))], [output])

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                                        opts: Any = None) -> dist.Work:
        works = [self.all_gather_single(output, x, opts) for output, x in zip(outputs, inputs)]
        return self._joined(works, list(outputs))

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    def reduce_scatter_single(self, output: torch.Tensor, x: torch.Tensor, opts: Any = None) -> dist.Work:
        p = self.comm.world_size
        op = self._reduce_op(opts or dist.ReduceScatterOptions(), "reduce_scatter_tensor")
        self._sizes("reduce_scatter_tensor", output, x, output.numel() * p == x.numel())
        x = x if x.dim() and x.shape[0] % p == 0 else x.reshape(p, -1)
        return self._run(opts, [(partial(self.comm.reduce_scatter, x, 0, op), partial(_fill, output))], [output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                                        opts: Any = None) -> dist.Work:
        works = [self.reduce_scatter_single(output, x, opts) for output, x in zip(outputs, inputs)]
        return self._joined(works, list(outputs))

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> dist.Work:
        op = self._reduce_op(opts or dist.ReduceScatterOptions(), "reduce_scatter")
        for out, pieces in zip(outputs, inputs):
            self._pieces("reduce_scatter", pieces, "input", out, "an output")
        return self._run(opts, [(partial(self.comm.reduce_scatter, torch.stack(pieces), 0, op), partial(_fill, out))
                                for out, pieces in zip(outputs, inputs)], outputs)

    def all_to_all_single(self, output: torch.Tensor, x: torch.Tensor, output_split_sizes: list[int] | None,
                          input_split_sizes: list[int] | None, opts: Any = None) -> dist.Work:
        for splits in (output_split_sizes, input_split_sizes):
            if splits and len(set(splits)) > 1:
                raise self._unsupported("all_to_all_single", f" with uneven split sizes {list(splits)}")
        self._sizes("all_to_all_single", output, x, output.numel() == x.numel())
        return self._run(opts, [(partial(self.comm.all_to_all, x, 0, 0), partial(_fill, output))], [output])

    alltoall_base = all_to_all_single

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._pieces("all_to_all", inputs, "input", inputs[0], "input 0")
        self._pieces("all_to_all", outputs, "output", inputs[0], "input 0")

        def fill(received: torch.Tensor) -> None:
            for out, piece in zip(outputs, received.unbind(0)):
                _fill(out, piece)
        return self._run(opts, [(partial(self.comm.all_to_all, torch.stack(inputs), 0, 0), fill)], outputs)

    def _joined(self, works: list[dist.Work], result: Any) -> dist.Work:
        """One handle for the handles of a coalesced call's pieces (all complete, or all posted)."""
        if all(isinstance(work, _Posted) for work in works) and works:
            return _Posted([pair for work in works for pair in work.posted], result)
        return _done(result)

    # ---- point to point -------------------------------------------------------------------------

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        self._tag("send", tag)
        (x,) = tensors
        return _PointToPoint(self.comm.isend(x, dst), None)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        self._tag("recv", tag)
        (out,) = tensors
        return _PointToPoint(self.comm.irecv(out, src), out)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> dist.Work:
        """The root sends each rank its piece (gloo's linear algorithm): recorded as sends and receives."""
        root, (out,) = (opts or dist.ScatterOptions()).rootRank, outputs
        if self.comm.rank != root:
            _fill(out, self.comm.irecv(out, root).wait())
            return _done(outputs)
        pieces = inputs[0]
        self._pieces("scatter", pieces, "input", out, "an output")
        sends = [self.comm.isend(piece, r) for r, piece in enumerate(pieces) if r != root]
        for work in sends:
            work.wait()
        _fill(out, pieces[root])
        return _done(outputs)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        """Every rank sends its tensor to the root (gloo's linear algorithm): recorded as sends and receives."""
        root, (x,) = (opts or dist.GatherOptions()).rootRank, inputs
        if self.comm.rank != root:
            self.comm.isend(x, root).wait()
            return _done(outputs)
        outs = outputs[0]
        self._pieces("gather", outs, "output", x, "an input")
        recvs = {r: self.comm.irecv(out, r) for r, out in enumerate(outs) if r != root}
        for r, work in recvs.items():
            _fill(outs[r], work.wait())
        _fill(outs[root], x)
        return _done(outputs)

    def _tag(self, op: str, tag: int) -> None:
        if tag:
            raise self._unsupported(op, f" with tag={tag} (messages between two ranks match in order)")

    # ---- not supported ----------------------------------------------------------------------------

    def reduce(self, *args: Any, **kwargs: Any) -> dist.Work:
        raise self._unsupported("reduce")

    def recv_anysource(self, *args: Any, **kwargs: Any) -> dist.Work:
        raise self._unsupported("recv from any source")

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("monitored_barrier")
