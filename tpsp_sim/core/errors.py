"""Errors raised by the simulator and the real backends.

Every error of a run is raised on every rank and by ``ts.run`` itself, within seconds.
"""

from __future__ import annotations


class SimulationError(RuntimeError):
    """Base class of every error a parallel run reports."""


class CollectiveMismatchError(SimulationError):
    """Ranks of one group called different collectives (op, shape, dtype or dims) at the same step."""


class DeadlockError(SimulationError):
    """Every live rank is blocked and none of them can ever make progress."""


class RankFailedError(SimulationError):
    """A rank raised an exception; ``.rank`` says which, ``__cause__`` holds the original."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank

    def __reduce__(self):
        return (type(self), (self.rank, str(self)))


def rank_failed(rank: int, cause: BaseException) -> RankFailedError:
    """A RankFailedError that is also an instance of ``cause``'s type, so ``except ValueError`` still works."""
    message = f"rank {rank} raised {type(cause).__name__}: {cause}"
    try:
        cls = _failed_types.setdefault(type(cause), type(f"RankFailedError[{type(cause).__name__}]",
                                                          (RankFailedError, type(cause)), {}))
        error = cls(rank, message)
    except TypeError:  # the original type cannot be mixed in (layout conflict, required arguments)
        error = RankFailedError(rank, message)
    error.__cause__ = cause
    return error


_failed_types: dict[type, type] = {}
