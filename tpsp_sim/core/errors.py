"""Errors raised by the simulator and the real backends.

Every error of a run is raised on every rank and by ``ts.run`` itself, within seconds.
"""

from __future__ import annotations

from typing import Iterable

MAX_LINES = 12  # per-rank lines an error message shows before summarising the rest


def format_ranks(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 7, 8]`` → ``"0-3, 5, 7-8"``."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def group_text(group: tuple[int, ...]) -> str:
    """A group as messages show it: the tuple up to 8 ranks, ranges beyond (``(0-999)``)."""
    return str(group) if len(group) <= 8 else f"({format_ranks(group)})"


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
        self._message = message

    def __str__(self) -> str:  # not the mixed-in type's __str__, which may read fields never set (UnicodeDecodeError)
        return self._message

    def __reduce__(self):
        return (type(self), (self.rank, str(self)))


def describe_error(error: BaseException) -> str:
    """``"Type: message"``, and never an exception of its own: a message whose ``__str__`` raises falls
    back to ``repr``, then to the type name alone (saying that the message could not be formatted)."""
    name = type(error).__name__
    try:
        text = str(error)
        return f"{name}: {text}" if text else name
    except Exception as broken:  # noqa: BLE001 - a user's exception class with a broken __str__
        why = f"its __str__ raised {type(broken).__name__}"
    try:
        return f"{name}: {error!r} ({why})"
    except Exception:  # noqa: BLE001 - and a broken __repr__
        return f"{name} (its message could not be formatted: {why}, and so did its __repr__)"


def rank_failed(rank: int, cause: BaseException) -> RankFailedError:
    """A RankFailedError that is also an instance of ``cause``'s type, so ``except ValueError`` still works.

    Only ``Exception`` types are mixed in: a failure must never also be a ``SystemExit`` (an uncaught
    one would end the script with its code, status 0 for ``sys.exit()``) or a ``KeyboardInterrupt``.
    The failure of a nested run (already a RankFailedError, maybe of a mixed-in type) keeps its type.
    Formatting the cause never fails (``describe_error``).
    """
    if isinstance(cause, SystemExit):
        message = f"rank {rank} raised SystemExit (sys.exit with exit code {cause.code!r})"
    else:
        message = f"rank {rank} raised {describe_error(cause)}"
    if not isinstance(cause, Exception):
        error = RankFailedError(rank, message)
        error.__cause__ = cause
        return error
    try:
        if isinstance(cause, RankFailedError):  # RankFailedError[ValueError] again: no consistent MRO with it mixed in
            cls = type(cause)
        else:
            cls = _failed_types.setdefault(type(cause), type(f"RankFailedError[{type(cause).__name__}]",
                                                              (RankFailedError, type(cause)), {}))
        error = cls(rank, message)
    except Exception:  # noqa: BLE001 - the original type cannot be mixed in (layout conflict, its own __init__)
        error = RankFailedError(rank, message)
    error.__cause__ = cause
    return error


_failed_types: dict[type, type] = {}


def unmatched_messages(messages: list[tuple[int, int, bool, tuple[int, ...], str, str]]) -> SimulationError:
    """The error for point-to-point messages still unmatched when every rank has returned: an isend or
    irecv nobody waited on (waiting would have deadlocked). NCCL's watchdog would flag them; the trace
    records their bytes all the same. ``messages``: (sender, receiver, posted by the sender, shape,
    dtype, scope), global ranks; the same text on every backend."""
    lines = []
    for src, dst, sending, shape, dtype, scope in messages:
        what = (f"rank {src}'s isend to rank {dst} was never received" if sending else
                f"rank {dst}'s irecv from rank {src} was never sent")
        lines.append(f"  {what} (shape {shape}, {dtype})" + (f" in scope {scope!r}" if scope else ""))
    shown = lines[:MAX_LINES] + ([f"  ... and {len(lines) - MAX_LINES} more"] if len(lines) > MAX_LINES else [])
    return SimulationError(f"the run ended with {len(lines)} point-to-point message(s) never matched (an isend or "
                           f"irecv that nobody waited on; the trace records their bytes all the same):\n"
                           + "\n".join(shown))
