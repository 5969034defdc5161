"""The one timing rule of every benchmark script: the fastest of ``repeats`` calls, after a warm-up call."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_of(repeats: int, fn: Callable[[], Any], *, warm_up: bool = True) -> tuple[float, Any]:
    """(fastest wall time in seconds of ``repeats`` calls of ``fn``, the last call's result)."""
    result = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result
