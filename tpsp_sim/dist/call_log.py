"""What each worker process is about to call, so the parent of a real run can blame the right rank.

Gloo cannot say who is at fault: a mismatched collective waits for its full timeout and then
reports a timeout, and a rank that died shows on its peers as "Connection reset by peer". So
every worker of ``ts.run(backend="gloo" | "nccl")`` appends one JSON line to its own file
*before* each call reaches ``torch.distributed`` (``CallLog``, some 10-50 µs per call), and
the parent, which watches the processes, reads them (``CallBook``):

* calls are matched by key: collective number ``k`` of a group (every rank of the group makes it)
  or message ``n`` from one rank to another (the sender and the receiver each post it); once two
  ranks posted the same key with different calls, that is a ``CollectiveMismatchError`` at once;
* when the run times out, a rank that posted a call that some other rank has not yet posted is
  waiting, and the ranks it waits for are the stalled ones.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import CollectiveMismatchError, DeadlockError
from ..core.ops import describe_call


class CallLog:
    """One worker's calls, one line each in ``path``, written before the call reaches the backend."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open until close()
        self._counts: dict[tuple, int] = {}
        self.comm_failed = False  # a torch.distributed call of this process raised

    def started(self) -> None:
        """This process has started and loaded fn; it now waits for the others to start."""
        self._write({"started": True})

    def joined(self) -> None:
        """This process has joined the process group."""
        self._write({"joined": time.time()})

    @contextmanager
    def calling(self, op: str, x: torch.Tensor | None, params: tuple, group: tuple[int, ...], scope: str,
                pair: tuple[int, int] | None = None) -> Iterator[list]:
        """Log the call, then run the block that makes it (given the call's key); a failure inside marks this
        process's failure as caused by communication. ``pair`` = (sender, receiver) global ranks for a
        send or a recv."""
        counted = ("p2p", group, *pair) if pair else ("collective", group)
        n = self._counts.get(counted, 0)
        self._counts[counted] = n + 1
        shape = None if x is None else [tuple(x.shape), str(x.dtype)]
        key = [*counted, n]
        self._write({"key": key, "what": [op, *([] if pair else [repr(params)])], "shape": shape,
                     "call": describe_call(op, x, params), "scope": scope})
        with self.failures():
            yield key

    @contextmanager
    def waiting(self, keys: list[list]) -> Iterator[None]:
        """Log that this process now waits for the sends or receives ``keys`` to complete (a blocking one, or
        the ``wait`` of an isend/irecv), then run the block that waits; failures count as communication's."""
        self._write({"waits": keys})
        with self.failures():
            yield

    @contextmanager
    def failures(self) -> Iterator[None]:
        """Mark an exception raised inside the block as a failure of communication."""
        try:
            yield
        except BaseException:
            self.comm_failed = True
            raise

    def close(self) -> None:
        self._file.close()

    def _write(self, line: dict) -> None:
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()


class CallBook:
    """The parent's view of every worker's ``CallLog``, read as the files grow."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._offsets = [0] * len(paths)
        self.started: set[int] = set()  # ranks that have started and loaded fn
        self.joined_at: dict[int, float] = {}  # rank -> time.time() it joined the group
        self.last: dict[int, dict] = {}  # rank -> its latest call
        self._posted: dict[tuple, dict[int, dict]] = {}  # key -> rank -> call, until every party posted it
        self._fresh: list[tuple] = []  # keys posted to since the last mismatch check
        self.waiting: dict[int, list[tuple]] = {}  # rank -> the send/recv keys it waits on, until its next call

    def read(self) -> None:
        """Take in the complete lines written since the last read."""
        for rank, path in enumerate(self._paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[rank])
                    data = f.read()
            except FileNotFoundError:
                continue
            complete = data[:data.rfind(b"\n") + 1]
            self._offsets[rank] += len(complete)
            for line in complete.decode("utf-8").splitlines():
                self._take(rank, json.loads(line))

    def _take(self, rank: int, line: dict) -> None:
        if "started" in line:
            self.started.add(rank)
            return
        if "joined" in line:
            self.joined_at[rank] = line["joined"]
            return
        if "waits" in line:
            self.waiting[rank] = [_key(key) for key in line["waits"]]
            return
        line["key"] = _key(line["key"])
        self.waiting.pop(rank, None)
        self.last[rank] = line
        self._posted.setdefault(line["key"], {})[rank] = line
        self._fresh.append(line["key"])

    def mismatch(self) -> CollectiveMismatchError | None:
        """A call that two ranks posted differently, as an error saying what each called; keys that every
        party posted alike are forgotten."""
        fresh, self._fresh = self._fresh, []
        for key in dict.fromkeys(fresh):
            calls = self._posted.get(key, {})
            if key[0] == "p2p":
                sender, receiver = key[2], key[3]
                if sender in calls and receiver in calls and calls[sender]["shape"] != calls[receiver]["shape"]:
                    (shape, dtype), (sent, sent_dtype) = calls[receiver]["shape"], calls[sender]["shape"]
                    return CollectiveMismatchError(
                        f"rank {receiver} receives a tensor of shape {tuple(shape)} ({dtype}) from rank {sender}, "
                        f"which sends shape {tuple(sent)} ({sent_dtype}) (message #{key[4]} between them)")
            elif len({json.dumps([c["what"], c["shape"]]) for c in calls.values()}) > 1:
                group, k = key[1], key[2]
                lines = [f"  rank {r}: {_describe(calls[r])}" if r in calls else f"  rank {r}: not called yet"
                         for r in group]
                return CollectiveMismatchError(f"ranks of group {group} made different calls at collective #{k} "
                                               f"of the group:\n" + "\n".join(lines))
            if key in self._posted and not self._missing(key):
                del self._posted[key]
        return None

    def stalled(self, running: list[int]) -> tuple[list[int], str]:
        """(the ranks to blame for a timeout, a line per running rank saying where it is).

        A running rank whose last call some other party has not posted yet waits for that party; the
        ranks to blame are the running ranks that others wait for while they compute, or every running
        rank when none waits. Empty when every running rank waits (their calls do not pair up)."""
        waits = {r: self._missing(self.last[r]["key"]) if r in self.last else [] for r in running}
        waiting = [r for r in running if waits[r]]
        waited_for = {m for r in waiting for m in waits[r]}
        blamed = [r for r in running if not waits[r] and (r in waited_for or not waiting)]
        lines = []
        for rank in running:
            call = self.last.get(rank)
            if waits[rank]:
                lines.append(f"  rank {rank}: waiting in {_describe(call)}, {_name(call['key'])}, "
                             f"for rank(s) {', '.join(map(str, waits[rank]))}")
            else:
                lines.append(f"  rank {rank}: computing (or inside native code) {self.where(rank)}")
        return blamed, "\n".join(lines)

    def waits_for_returned(self, returned: list[int]) -> DeadlockError | None:
        """A rank waiting for a rank that has already returned from fn can never go on (a returned rank makes
        no more calls): the DeadlockError naming them, at once rather than at the timeout; None if there is
        none. A rank waits in its last call if that is a collective, and on the sends and receives it logged
        a wait for (an isend nobody waits on yet is not waited on)."""
        gone, stuck = set(), {}
        for rank, call in self.last.items():
            if rank in returned:
                continue
            keys = [call["key"]] if call["key"][0] == "collective" else self.waiting.get(rank, [])
            for key in keys:
                missing = self._missing(key)
                if set(missing) & set(returned):
                    gone.update(set(missing) & set(returned))
                    stuck[rank] = (f"  rank {rank}: waits in {_describe(self._posted[key][rank])}, {_name(key)}, "
                                   f"for rank(s) {', '.join(map(str, missing))}")
                    break
        if not stuck:
            return None
        lines = [f"  rank {r}: has returned from fn" for r in sorted(gone)] + [stuck[r] for r in sorted(stuck)]
        return DeadlockError("a rank waits for a rank that has already returned from fn, so its call can never "
                             "complete:\n" + "\n".join(lines))

    def unmatched(self) -> list[tuple[int, int, bool, tuple[int, ...], str, str]]:
        """The sends and receives one side posted and the other never did, for ``unmatched_messages``."""
        found = []
        for key, calls in self._posted.items():
            if key[0] == "p2p" and self._missing(key):
                [(rank, call)] = calls.items()
                (shape, dtype), scope = call["shape"], call["scope"]
                found.append((key[2], key[3], rank == key[2], tuple(shape), dtype, scope))
        # sends first, then receives, by ranks (as the simulator lists them), not in the order the logs were read
        return sorted(found, key=lambda message: (not message[2], message[0], message[1]))

    def where(self, rank: int) -> str:
        """Where ``rank`` was, from its last logged call."""
        call = self.last.get(rank)
        return "before its first call" if call is None else f"after calling {_describe(call)}"

    def _missing(self, key: tuple) -> list[int]:
        """The parties of ``key`` that have not posted it (none once every party has)."""
        parties = key[2:4] if key[0] == "p2p" else key[1]
        posted = self._posted.get(key)
        return [] if posted is None else [r for r in parties if r not in posted]


def _key(parts: list) -> tuple:
    """A key as logged (JSON lists) as the tuple it is matched by."""
    return tuple(tuple(part) if isinstance(part, list) else part for part in parts)


def _name(key: tuple) -> str:
    if key[0] == "p2p":
        return f"message #{key[4]} from rank {key[2]} to rank {key[3]}"
    return f"collective #{key[2]} of group {key[1]}"


def _describe(call: dict) -> str:
    return f"{call['call']} in scope {call['scope']!r}" if call["scope"] else call["call"]
