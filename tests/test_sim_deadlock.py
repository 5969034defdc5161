"""Deadlock detection is exact: a run fails with DeadlockError when, and only when, no rank can ever
progress. Random programs (collectives on subgroups, sendrecv rings, blocking send/recv rings, with
faults injected) are judged by an independent oracle that replays them on program counters alone."""

import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts

pytestmark = pytest.mark.timeout(120)


def make_program(p: int, seed: int, faults: int):
    """(subgroups, per-rank op lists). Ops: ("coll", g) all_reduce on subgroup g; ("sr", dst, src) one
    sendrecv; ("send", dst) / ("recv", src) blocking; ("nap",) a short sleep that shuffles timing."""
    rng = random.Random(seed)
    groups = [sorted(rng.sample(range(p), rng.randint(1, p))) for _ in range(rng.randint(1, 3))]
    progs = [[] for _ in range(p)]
    for _ in range(rng.randint(1, 8)):
        g = rng.randrange(len(groups))
        members = groups[g]
        kind = rng.choice(["coll", "sr", "ordered", "send_first"])
        if kind == "coll" or len(members) < 2:
            for m in members:
                progs[m].append(("coll", g))
            continue
        for i, m in enumerate(members):
            right, left = members[(i + 1) % len(members)], members[i - 1]
            if kind == "sr":
                progs[m].append(("sr", right, left))
            elif kind == "ordered" and i % 2:
                progs[m] += [("recv", left), ("send", right)]
            else:  # "send_first" on every rank: the classic ring-ordering deadlock
                progs[m] += [("send", right), ("recv", left)]
    for _ in range(faults):
        rank = rng.randrange(p)
        if progs[rank]:
            del progs[rank][rng.randrange(len(progs[rank]))]
    for prog in progs:
        for _ in range(rng.randint(0, 2)):
            prog.insert(rng.randint(0, len(prog)), ("nap",))
    return groups, progs


def oracle_deadlocks(p: int, groups, progs) -> bool:
    """Replay on program counters: a rank at an op has posted it; an op completes once its partners have
    posted theirs (k-th call of group g with every member's k-th call of g; the k-th message on a channel
    with the other side's k-th). Deadlock iff the fixed point leaves a rank unfinished."""
    where = {}  # (kind, key, k) -> {rank: index of the op that posts it}
    needs = [[] for _ in range(p)]  # needs[r][i]: the (kind, key, k, other ranks) that op i waits for
    counters = {}
    for r, prog in enumerate(progs):
        for i, op in enumerate(prog):
            posts, waits = [], []
            if op[0] == "coll":
                posts.append(("coll", op[1]))
                waits.append((("coll", op[1]), groups[op[1]]))
            if op[0] in ("send", "sr"):
                posts.append(("msg", (r, op[1])))
                waits.append((("msg", (r, op[1])), [op[1]]))
            if op[0] in ("recv", "sr"):
                src = op[1] if op[0] == "recv" else op[2]
                posts.append(("msg", (src, r)))
                waits.append((("msg", (src, r)), [src]))
            keyed = []
            for kind, key in posts:
                k = counters.get((kind, key, r), 0)
                counters[kind, key, r] = k + 1
                where.setdefault((kind, key, k), {})[r] = i
                keyed.append(k)
            needs[r].append([(kind, key, k, others) for ((kind, key), others), k in zip(waits, keyed)])
    pc = [0] * p
    changed = True
    while changed:
        changed = False
        for r in range(p):
            if pc[r] < len(progs[r]) and all(
                    o in where.get((kind, key, k), {}) and pc[o] >= where[kind, key, k][o]
                    for kind, key, k, others in needs[r][pc[r]] for o in others):
                pc[r] += 1
                changed = True
    return any(pc[r] < len(progs[r]) for r in range(p))


def run_program(comm, groups, progs):
    subs = [comm.new_group(g) for g in groups]
    x = torch.full((2,), float(comm.rank))
    out = []
    for op in progs[comm.rank]:
        if op[0] == "coll":
            out.append(subs[op[1]].all_reduce(x))
        elif op[0] == "sr":
            out.append(comm.sendrecv(x, dst=op[1], src=op[2]))
        elif op[0] == "send":
            comm.send(x, op[1])
        elif op[0] == "recv":
            out.append(comm.recv(x, op[1]))
        else:
            time.sleep(0.002)
    return out


def check(p, seed, faults):
    groups, progs = make_program(p, seed, faults)
    if oracle_deadlocks(p, groups, progs):
        with pytest.raises(ts.DeadlockError):
            ts.run(run_program, groups, progs, world_size=p, timeout=30)
        return True
    res = ts.run(run_program, groups, progs, world_size=p, timeout=30)
    if faults == 0:  # every value is the one the program asked for
        for r, out in enumerate(res.outputs):
            expected = [float(sum(groups[op[1]])) if op[0] == "coll" else float(op[-1])
                        for op in progs[r] if op[0] in ("coll", "sr", "recv")]
            assert [o[0].item() for o in out] == expected
    return False


@settings(max_examples=100, deadline=None)
@given(p=st.integers(2, 10), seed=st.integers(0, 10**6), faults=st.integers(0, 2))
def test_property_deadlock_is_reported_exactly_when_the_oracle_finds_one(p, seed, faults):
    check(p, seed, faults)


@pytest.mark.parametrize("deadlocks", [True, False])
def test_programs_on_48_ranks_that_do_and_do_not_deadlock(deadlocks):
    """The first three generated 48-rank programs (with and without faults) of each outcome."""
    cases = [(seed, seed % 3) for seed in range(200)
             if oracle_deadlocks(48, *make_program(48, seed, seed % 3)) == deadlocks][:3]
    assert len(cases) == 3
    for seed, faults in cases:
        assert check(48, seed, faults) == deadlocks


def test_many_ranks_on_a_2d_mesh_with_rings_on_the_rows():
    """64 ranks as 8 x 8: all_reduce on columns, sendrecv rings on rows, rounds in a row; exact values."""
    def fn(comm):
        r, c = divmod(comm.rank, 8)
        rows = [comm.new_group([8 * i + j for j in range(8)]) for i in range(8)]
        cols = [comm.new_group([8 * i + j for i in range(8)]) for j in range(8)]
        row, col = rows[r], cols[c]
        x = torch.tensor([float(comm.rank)])
        for _ in range(5):
            x = row.sendrecv(x, (row.rank + 1) % 8, (row.rank - 1) % 8)
            total = col.all_reduce(x)
        return x.item(), total.item()

    res = ts.run(fn, world_size=64)
    for rank, (x, total) in enumerate(res.outputs):
        r, c = divmod(rank, 8)
        assert x == 8 * r + (c - 5) % 8  # five shifts to the right along the row
        assert total == sum(8 * i + (c - 5) % 8 for i in range(8))


def test_a_rank_that_skips_one_call_on_64_ranks_is_a_deadlock_naming_it():
    def fn(comm):
        c = comm.rank % 8
        cols = [comm.new_group([8 * i + j for i in range(8)]) for j in range(8)]
        with comm.scope("col"):
            if comm.rank != 13:
                cols[c].all_reduce(torch.ones(1))

    with pytest.raises(ts.DeadlockError) as info:
        ts.run(fn, world_size=64)
    assert ("ranks 5, 21, 29, 37, 45, 53, 61: waits in all_reduce(shape=(1,), dtype=torch.float32, op='sum'), "
            "collective #0 of group (5, 13, 21, 29, 37, 45, 53, 61), for group ranks [1] that have not called it "
            "in scope 'col'") in str(info.value)
    assert "ranks 0-4, 6-20, 22-28, 30-36, 38-44, 46-52, 54-60, 62-63: has returned from fn" in str(info.value)


def test_a_sendrecv_send_completes_only_when_matched_so_a_deadlock_nccl_has_is_reported():
    """Rank 0's send to rank 1 cannot complete on NCCL until rank 1 posts its receive, which comes after
    a collective that waits for rank 0. An eager (buffered) send would let this run finish."""
    def fn(comm):
        x = torch.ones(2)
        if comm.rank == 0:
            comm.sendrecv(x, 1, 2)
            comm.all_reduce(x)
        elif comm.rank == 1:
            comm.all_reduce(x)
            comm.recv(x, 0)
        else:
            comm.send(x, 0)
            comm.all_reduce(x)

    with pytest.raises(ts.DeadlockError, match=r"rank 0: waits in send to rank 1") as info:
        ts.run(fn, world_size=3)
    assert "ranks 1-2: waits in all_reduce" in str(info.value)
