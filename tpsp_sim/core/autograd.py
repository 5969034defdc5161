"""``CommFunction``: the base of every differentiable collective (an autograd Function that communicates).

A backward runs after the forward's ``with comm.scope(...)`` has exited, so a collective called
from it would be recorded under the wrong scope. A subclass of ``CommFunction`` cannot get this
wrong: its forward's ``Comm`` argument and scope are kept on ``ctx`` (``ctx.comm``, ``ctx.scope``)
and its backward runs under that scope (the calls are recorded with phase "backward").
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .comm import Comm


class CommFunction(torch.autograd.Function):
    """An autograd Function whose backward is recorded under the scope its forward ran in.

    Write ``forward(ctx, ...)`` with one ``Comm`` among its arguments and ``backward(ctx, *grads)`` as
    for any Function; read the comm as ``ctx.comm`` in backward.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__  # only what this class defines: a subclass of a subclass is not wrapped twice
        if "forward" in own:
            cls.forward = staticmethod(_keeping_scope(cls, getattr(own["forward"], "__func__", own["forward"])))
        if "backward" in own:
            cls.backward = staticmethod(_replaying_scope(getattr(own["backward"], "__func__", own["backward"])))


def _keeping_scope(cls: type, forward):
    @functools.wraps(forward)
    def scoped_forward(ctx, *args):
        comm = next((a for a in args if isinstance(a, Comm)), None)
        if comm is None:
            raise TypeError(f"{cls.__name__}.forward needs a Comm argument (it is a CommFunction)")
        ctx.comm, ctx.scope = comm, comm.current_scope
        return forward(ctx, *args)
    return scoped_forward


def _replaying_scope(backward):
    @functools.wraps(backward)
    def scoped_backward(ctx, *grads):
        with ctx.comm.replay_scope(ctx.scope):
            return backward(ctx, *grads)
    return scoped_backward
