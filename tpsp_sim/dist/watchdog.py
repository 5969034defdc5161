"""The watchdog of one real run: kills the workers' process groups if ``ts.run``'s process dies (POSIX).

A worker dies with its parent on its own (worker.py, ``_die_with_parent``), but the processes it
started (``subprocess``, ``multiprocessing``, a DataLoader's workers) would not: they are orphaned,
adopted by init, and live on. Each worker leads its own process group, which its children join, so
killing the groups kills them all; when the parent is killed (SIGKILL, or a SIGTERM it does not
handle) nothing of it runs to do that, hence this separate, tiny process.

Why not PR_SET_CHILD_SUBREAPER (prctl(2)): it makes a process adopt its orphaned descendants, which
would have to be ``ts.run``'s own process (the user's Python, which would then have to reap strangers),
and when that process dies its orphans go to the next subreaper or init and live on: it cannot help
in the one case this is for. Limits: Linux and other POSIX systems; a descendant that leaves its
group (``setsid``, ``start_new_session=True``) escapes, as from any group-based cleanup.

Protocol, on standard input: one line per worker with its pid (its process group id), then ``done``
once ``ts.run`` has ended the workers itself. End of input without ``done`` means the parent is gone:
kill every group and exit. Run by path with ``python -I -S`` (the standard library only, no torch),
in its own session, so a Ctrl-C to the terminal's foreground group does not reach it.
"""

import os
import signal
import sys


def main() -> None:
    groups: list[int] = []
    for line in sys.stdin:
        if line.strip() == "done":
            return
        groups.append(int(line))
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # every member has ended
            pass


if __name__ == "__main__":
    main()
