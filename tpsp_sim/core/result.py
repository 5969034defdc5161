"""What ``ts.run`` returns, on every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .trace import CommTrace


@dataclass
class RunResult:
    """What ``ts.run`` returns: each rank's return value, and the trace of every rank's calls."""

    outputs: list[Any]
    trace: CommTrace
