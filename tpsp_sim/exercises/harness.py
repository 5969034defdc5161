"""What every checker shares: run the learner's function on virtual ranks, compare what it returns
with the dense answer, compare the calls it made and the bytes it sent with the closed forms, and
say in words what is wrong."""

from __future__ import annotations

import inspect
import linecache
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Iterable

import torch

from ..core.errors import DeadlockError, RankFailedError, SimulationError, describe_error
from ..core.result import RunResult
from ..core.trace import CommTrace
from ..launch import run

WORLD_SIZES = (2, 3, 4)  # every rank-level exercise is checked on these, an odd one included
ATOL = 1e-12  # float64 throughout
TIMEOUT = 20.0  # seconds; a deadlock is reported long before (the simulator sees every rank blocked)
P2P = ("send", "recv")  # sendrecv, isend/irecv and send/recv are recorded as these


class Problem(Exception):
    """The learner's function could not be run to the end (it raised, or the ranks deadlocked)."""


@dataclass(frozen=True)
class Exercise:
    """One exercise: what to write, how to check it on each case, and a reference solution."""

    name: str
    notebook: str  # where it is posed, e.g. "02_sequence_parallel"
    task: str  # what to write, in one line
    cases: tuple[int, ...]  # world sizes (or numbers of key tiles) to check on
    case_label: str  # "ranks" or "key tiles"
    check_case: Callable[[Callable, int], list[str]]  # (learner's fn, case) -> problems in words
    checked: str  # what a pass means
    solution: Callable
    solution_source: tuple[Any, ...]  # what show_solution prints (functions, classes)


@dataclass(frozen=True)
class Report:
    """A checker's verdict: ``ok``, or the ``problems`` in words (for the first case that fails)."""

    exercise: str
    problems: tuple[str, ...] = ()
    checked: str = ""
    reference: "Report | None" = None  # set when the learner's stub is not written yet

    @property
    def ok(self) -> bool:
        return not self.problems and self.reference is None

    def __str__(self) -> str:
        if self.reference is not None:
            return (f"… {self.exercise} is not written yet (the stub raises NotImplementedError): write it and run "
                    f"this cell again; show_solution({self.exercise!r}) prints one answer.\n"
                    f"The reference solution, checked the same way:\n{self.reference}")
        if self.ok:
            return f"✓ {self.exercise}: {self.checked}"
        return f"✗ {self.exercise}:\n" + "\n".join(f"  - {p}" for p in self.problems)

    __repr__ = __str__


def find(table: dict[str, Exercise], name: str, noun: str = "exercise") -> Exercise:
    """The entry ``name`` of ``table``; a ValueError naming the known ones (``noun``: "exercise", "puzzle")."""
    if name not in table:
        raise ValueError(f"no {noun} {name!r}; the {noun}s are {sorted(table)}")
    return table[name]


def check_exercise(table: dict[str, Exercise], name: str, fn: Callable, noun: str = "exercise") -> Report:
    """Check ``fn`` for entry ``name`` of ``table`` on each of its cases: the first case that fails says what is
    wrong; a stub that still raises NotImplementedError is reported with the reference solution checked instead."""
    ex = find(table, name, noun)
    for case in ex.cases:
        try:
            problems = ex.check_case(fn, case)
        except NotImplementedError as error:  # the unwritten stub, or an operation torch lacks (issue 24 item 6)
            if unwritten_stub(error):
                return Report(name, reference=check_exercise(table, name, ex.solution, noun))
            problems = [not_the_stub(error)]
        except Problem as error:
            problems = [str(error)]
        if problems:
            return Report(name, tuple(f"on {case} {ex.case_label}: {p}" for p in problems))
    return Report(name, checked=ex.checked)


def print_solution(table: dict[str, Exercise], name: str, noun: str = "exercise") -> None:
    """Print the source of the reference solution of entry ``name`` of ``table``."""
    print("\n\n".join(inspect.getsource(obj).rstrip() for obj in find(table, name, noun).solution_source))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> RunResult:
    """``ts.run(fn, *args)`` on virtual ranks; a deadlock or a rank's exception becomes a ``Problem``
    (a ``NotImplementedError`` passes through: ``check`` tells the unwritten stub from one raised by torch)."""
    try:
        return run(fn, *args, world_size=world_size, timeout=TIMEOUT)
    except NotImplementedError:
        raise
    except DeadlockError as error:
        raise Problem(f"deadlock — {error}") from None
    except SimulationError as error:
        raise Problem(str(error)) from None


def unwritten_stub(error: BaseException) -> bool:
    """Whether ``error`` (a NotImplementedError, maybe wrapped in a RankFailedError) is the learner's stub:
    raised by a ``raise`` statement in the learner's code (in the function checked, or a method it calls,
    such as an autograd Function's forward). A NotImplementedError from torch (an op a backend lacks, a
    Module without forward) is raised in torch's own code, or by a C call on a line that does not raise."""
    tb = _innermost(error)
    if tb is None:
        return True
    filename = tb.tb_frame.f_code.co_filename
    if filename.startswith(_TORCH_DIR):
        return False
    line = linecache.getline(filename, tb.tb_lineno)
    return not line or line.lstrip().startswith("raise")  # no source to read (exec'd code): the learner's


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def not_the_stub(error: BaseException) -> str:
    """A NotImplementedError raised inside the learner's code but not by its stub, in words."""
    tb = _innermost(error)
    if isinstance(error, RankFailedError) and error.__cause__ is not None:
        error = error.__cause__
    where = "" if tb is None else f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
    return (f"raised {describe_error(error)}{where} — not the unwritten stub: an operation inside the function "
            f"is not implemented")


def _innermost(error: BaseException) -> TracebackType | None:
    """The traceback entry where ``error`` (or, for a rank's failure, its cause) was raised."""
    if isinstance(error, RankFailedError) and error.__cause__ is not None:
        error = error.__cause__
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def matches(got: Any, want: torch.Tensor, atol: float = ATOL) -> bool:
    """Whether ``got`` is a tensor of ``want``'s shape within ``atol`` of it."""
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and bool(((got.detach().to(want.dtype) - want).abs() <= atol).all()))


def compare(what: str, got: Any, want: torch.Tensor, atol: float = ATOL,
            explain: Callable[[torch.Tensor], str | None] | None = None) -> list[str]:
    """[] if ``got`` is ``want`` within ``atol``, else one sentence saying how it differs; ``explain(got)``
    may name the mistake (a wrong answer it recognises), else a constant factor is named if there is one."""
    if not isinstance(got, torch.Tensor):
        return [f"{what}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}"]
    if got.shape != want.shape:
        return [f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"]
    got = got.detach().to(want.dtype)
    bad = ~torch.isfinite(got)
    if bad.any():
        return [f"{what}: {int(bad.sum())} of {got.numel()} values are NaN or inf"]
    error = float((got - want).abs().max())
    if error <= atol:
        return []
    named = explain(got) if explain is not None else None
    ratio = got / want
    hint = (f" — {named}" if named else
            f" (every value is {float(ratio.flatten()[0]):.4g} × the answer)"
            if want.abs().min() > 0 and torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) else "")
    return [f"{what}: differs from the dense answer by up to {error:.3g} (tolerance {atol:g}){hint}"]


def first(problems: Iterable[list[str]]) -> list[str]:
    """The problems of the first rank that has any (the others usually repeat them)."""
    return next((p for p in problems if p), [])


def describe(ops: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(ops.items())) or "nothing"


def check_calls(trace: CommTrace, world_size: int, phase: str, *, expected: dict[str, int] | None = None,
                allowed: Iterable[str] | None = None) -> list[str]:
    """Per rank, the ops called in ``phase``: exactly ``expected`` (op -> count), or only ops in ``allowed``."""
    def one(rank: int) -> list[str]:
        ops = trace.ops(rank=rank, phase=phase)
        if expected is not None and ops != expected:
            return [f"{phase}: rank {rank} called {describe(ops)}; expected {describe(expected)}"]
        extra = sorted(set(ops) - set(allowed)) if allowed is not None else []
        if extra:
            return [f"{phase}: rank {rank} called {', '.join(extra)}; write it with {' and '.join(sorted(allowed))} "
                    f"only"]
        return []
    return first(one(r) for r in range(world_size))


def check_bytes(trace: CommTrace, world_size: int, phase: str, expected: int, formula: str,
                fields: tuple[str, ...] = ("sent_bytes",)) -> list[str]:
    """Per rank, the bytes sent (and/or received) in ``phase`` equal ``expected`` (``formula`` says why)."""
    def one(rank: int) -> list[str]:
        for field in fields:
            moved = trace.total(field, rank=rank, phase=phase)
            if moved != expected:
                verb = "sent" if field == "sent_bytes" else "received"
                return [f"{phase}: rank {rank} {verb} {moved} B; expected {formula} = {expected} B"]
        return []
    return first(one(r) for r in range(world_size))


def randn(*shape: int, seed: int) -> torch.Tensor:
    """A float64 tensor drawn from its own generator (virtual ranks share torch's global one)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
