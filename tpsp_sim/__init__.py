"""tpsp_sim: tensor, sequence and context parallelism on simulated (or real) ranks, byte by byte."""

from . import mappings
from .comm import Comm, Work
from .errors import CollectiveMismatchError, DeadlockError, RankFailedError, SimulationError
from .launch import run
from .runtime import RunResult, SimComm
from .trace import CommEvent, CommTrace, ComputeSpan, WaitMark, format_bytes, wire_bytes

__version__ = "0.1.0"

__all__ = [
    "CollectiveMismatchError", "Comm", "CommEvent", "CommTrace", "ComputeSpan", "DeadlockError",
    "RankFailedError", "RunResult", "SimComm", "SimulationError", "WaitMark", "Work", "format_bytes",
    "mappings", "run", "wire_bytes",
]
