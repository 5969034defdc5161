"""What communication costs on real hardware: the alpha-beta model of ring collectives.

A message of n bytes over a link of bandwidth B (bytes/s per direction) with latency α (s per
message) takes α + n/B. A ring collective on p ranks runs in p-1 steps (all_reduce in 2(p-1):
a reduce-scatter, then an all-gather), each rank sending one piece per step; the bytes a rank
sends over the whole call are exactly its wire bytes. Both come from the table of collectives
(``tpsp_sim/core/ops.py``: wire bytes and latency steps per op), so one call takes

    latency_steps · α + max(sent, received) / B

(across n nodes, the steps the op takes on n ranks pay the inter-node α and the others the
intra-node one, as NCCL's tuning model counts them: all_reduce 2(n−1)·α + 2(p−n)·α_intra), where
B is the link's bus bandwidth as nccl-tests measures it (``Link.busbw``: the achieved figure
where the link has one, its datasheet figure otherwise; NVLink SHARP's for an all_reduce on a link
that has it), e.g. all_reduce 2α·(p-1) + 2(p-1)/p·N/B; all_to_all α + (p-1)/p·N/B (NCCL posts all its pairs at once).

(Thakur, Rabenseifner & Gropp 2005; the nccl-tests "bus bandwidth" convention).

An all_reduce whose group spans nodes (its link has a ``NodeSpan``: n nodes, at most r ranks and at
least g NICs in one) may instead run as NCCL's tree (the double binary tree of Sanders, Speck & Träff
2009, NCCL 2.4): a chain through the ranks of each node, two binary trees between nodes, each reducing
half the buffer up and broadcasting it down, pipelined. Every node is an inner node of one tree and a
leaf of the other, so 2N bytes cross its g NICs (N on two nodes, where each tree is one edge), and the
chain carries 2N through each GPU's intra-node link; NCCL's tuning model runs trees at 0.92 of those
bandwidths (``TREE_BUSBW_FRACTION``). So

    tree: 2·((r−1)·α_intra + ⌊log2 n⌋·α) + max(k·N / (g·B_nic), 2N / B_intra) / 0.92    (k = 1 on two nodes, else 2)
    ring: 2(n−1)·α + 2(p−n)·α_intra + 2(p−1)/p·N / min(B_intra, g·B_nic)

(no B_intra term when r = 1), and the call costs the smaller: ``all_reduce_times`` gives both,
``all_reduce_algorithm`` the winner, as NCCL's tuner picks by the same two kinds of terms. The tree wins
for latency-bound sizes (the ring pays 2(p−1) latency steps, the tree 2(r−1 + ⌊log2 n⌋)), and at any
size on two nodes of g ≥ 2 ranks whose NICs carry less than 0.92·(p−1)/p of the NVLink's bandwidth
(g·B_nic < 0.92·(p−1)/p·B_intra: half the ring's bytes cross them; nccl-tests#22 measured a 1 GB
all_reduce on two 8-GPU nodes with one 100 Gb/s NIC each in 134 ms by tree, 268 ms by ring;
``benchmarks/published.py``). Where both move about 2N over the same busiest link B (more than two
nodes; or a DGX, whose NVLink is slower than its 8 NICs), the tree's 0.92 makes the ring win above
N* = ((n−1−⌊log2 n⌋)·α + (p−n−r+1)·α_intra)·B / (1/0.92 − (p−1)/p) bytes: the ring's extra latency over
the tree's extra bandwidth time per byte (2N/0.92 against 2(p−1)/p·N: 24% more over 8 ranks, 9% as
p grows). The trace keeps the ring's wire
bytes (the op table); only the seconds follow the tree. The model ignores
contention and the switch topology: it is the time one rank's link is busy. Links are full duplex:
``estimate`` prices a send and a receive that a rank posts together (a ring shift) as the slower of
the two, not their sum (``Estimate``). On a ``Cluster`` (``cluster.py``) each call is priced on its
group's link: intra-node, or, if it spans nodes, NCCL's one ring per NIC (``Cluster.link``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..core.ops import latency_steps, wire_bytes
from ..core.table import Table
from ..core.trace import CommEvent, CommTrace, ComputeSpan, format_bytes
from .cluster import CLUSTERS, Cluster, Link, NodeSpan, cluster  # noqa: F401 (ts.cost.Cluster, ts.cost.CLUSTERS)


# The one hardware type is ``Cluster`` (cluster.py); a single link is a one-level cluster, made by
# ``Hardware(name, link_bandwidth, latency, peak_flops)`` (the name this constructor has always had).
Hardware = Cluster.one_link
hardware = cluster  # a preset by key, or a cluster as is: the one normalisation of ``hw``

# The one-link presets: the one-level clusters of ``CLUSTERS`` (datasheet figures, sources in cluster.py).
PRESETS: dict[str, Cluster] = {key: c for key, c in CLUSTERS.items() if c.gpus_per_node is None}
H100_NVLINK, A100_NVLINK, PCIE_GEN4, INFINIBAND_HDR, INFINIBAND_NDR, A100_INFINIBAND = (
    PRESETS[k] for k in ("h100-nvlink", "a100-nvlink", "pcie-gen4", "ib-hdr", "ib-ndr", "a100-ib"))


def collective_time(op: str, nbytes: int, world_size: int, hw: Cluster | Link | str, *,
                    ranks: Sequence[int] | None = None) -> float:
    """Seconds one rank spends in ``op`` (alpha-beta, ring); ``nbytes`` is its input, as in ``CommEvent.nbytes``.

    latency_steps · α + max(sent, received) / busbw, with the link's measured bus bandwidth (``Link.busbw``;
    ``Link.nvls`` for an all_reduce where the link has NVLink SHARP); an all_reduce across nodes takes the
    faster of the ring and NCCL's tree (``all_reduce_algorithm``). ``hw``: a ``Link``; or a ``Cluster``
    (a one-link ``Hardware`` is one) or a key of ``CLUSTERS``, as ``estimate`` and ``timeline`` take. A
    cluster with two links prices the call on its group's link (``Cluster.link``: NCCL's one ring per
    NIC): pass the group's global ``ranks`` (``world_size`` of them), or the link itself.
    """
    _check_sizes("collective_time", nbytes, world_size)
    link = _link(hw, world_size, ranks)
    if op == "all_reduce":
        return min(all_reduce_times(int(nbytes), int(world_size), link).values())
    return _ring_time(op, int(nbytes), int(world_size), link)


def _check_sizes(where: str, nbytes: int, world_size: int) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not nbytes >= 0:
        raise ValueError(f"{where}: nbytes must be a number of bytes >= 0, got {nbytes!r}")
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise ValueError(f"{where}: world_size must be an integer >= 1, got {world_size!r}")


# NCCL's tuning model prices a tree all_reduce at 0.92 of the bus bandwidth of its channels ("busBw * .92",
# ncclTopoTuneModel in src/graph/tuning.cc, since NCCL 2.8.3; 0.9 before), under every protocol; the further
# factors of its LL and LL128 protocols, its per-channel cap and its correction factors for medium sizes are
# not modelled.
TREE_BUSBW_FRACTION = 0.92


def all_reduce_times(nbytes: int, world_size: int, hw: Cluster | Link | str, *,
                     ranks: Sequence[int] | None = None) -> dict[str, float]:
    """{"ring": seconds, "tree": seconds} of an all_reduce of ``nbytes`` on this group (arguments as in
    ``collective_time``; formulas in this module's docstring); a group on one node or one link has only "ring"."""
    _check_sizes("all_reduce_times", nbytes, world_size)
    link = _link(hw, world_size, ranks)
    times = {"ring": _ring_time("all_reduce", int(nbytes), int(world_size), link)}
    span = link.span
    if span is not None:
        depth = span.nodes.bit_length() - 1  # ⌊log2 n⌋: the inter-node trees' depth
        latency = 2 * ((span.node_ranks - 1) * span.intra.latency + depth * span.inter.latency)
        network = (1 if span.nodes == 2 else 2) * nbytes / (span.nics * span.inter.busbw)
        chain = 2 * nbytes / span.intra.busbw if span.node_ranks > 1 else 0.0
        times["tree"] = latency + max(network, chain) / TREE_BUSBW_FRACTION
    return times


def all_reduce_algorithm(nbytes: int, world_size: int, hw: Cluster | Link | str, *,
                         ranks: Sequence[int] | None = None) -> str:
    """"ring" or "tree": the faster way NCCL can run an all_reduce of ``nbytes`` on this group (``all_reduce_times``).
    A group inside one node, or on a one-level cluster, is always "ring" (NVLS where the link has it)."""
    times = all_reduce_times(nbytes, world_size, hw, ranks=ranks)
    return min(times, key=times.get)


def _ring_time(op: str, nbytes: int, p: int, link: Link) -> float:
    sent, received = wire_bytes(op, nbytes, p)  # broadcast: the root's share, N
    return _ring_latency(op, p, link) + max(sent, received) / link.bandwidth_of(op)


def _ring_latency(op: str, p: int, link: Link) -> float:
    """latency_steps · α; across n nodes, NCCL's split: of the ring's steps, as many as ``op`` takes on n ranks
    cross a node boundary (α between nodes), the others stay inside a node (α_intra)."""
    steps = latency_steps(op, p)
    if link.span is None:
        return steps * link.latency
    crossing = latency_steps(op, link.span.nodes)
    return crossing * link.latency + (steps - crossing) * link.span.intra.latency


def _link(hw: Cluster | Link | str, world_size: int, ranks: Sequence[int] | None) -> Link:
    """The link a call of ``world_size`` ranks (``ranks``, where the cluster needs them) runs on."""
    if isinstance(hw, Link):
        return hw
    c = cluster(hw)
    if ranks is not None and len(ranks) != world_size:
        raise ValueError(f"collective_time: ranks={tuple(ranks)} are {len(ranks)} ranks, world_size is {world_size}")
    if c.gpus_per_node is None:
        return c.intra_node
    if ranks is None:
        raise ValueError(f"collective_time: cluster {c.name!r} has two links (intra-node {c.intra_node.name}, "
                         f"inter-node {c.inter_node.name}); pass ranks= (the group's global ranks) or the link, "
                         f"cluster.link(ranks)")
    return c.link(ranks)


def event_time(event: CommEvent, hw: Cluster | Link | str) -> float:
    """``collective_time`` of one recorded call, on the group it ran on: for a send or recv, its
    transfer's α + n/B (``estimate`` charges a recv posted together with a send less; see ``Estimate``)."""
    return collective_time(event.op, event.nbytes, len(event.group), hw)


def _flops_and_bandwidth(hw: Cluster | str, link: Link | None) -> tuple[float, float]:
    """(peak FLOP/s, link bytes/s): ``link`` if given, else the cluster's inter-node link (its one link
    on a one-level cluster): one GPU's link, as a ring's point-to-point shifts use."""
    c = cluster(hw)
    return c.peak_flops, (link or c.inter_node).busbw


def _kv_fraction(n_heads: int | None, n_kv_heads: int | None) -> float:
    if (n_heads is None) != (n_kv_heads is None):
        raise ValueError(f"give both n_heads and n_kv_heads or neither (got {n_heads}, {n_kv_heads})")
    if n_heads is None:
        return 1.0
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} >= 1")
    return n_kv_heads / n_heads


def ring_overlap_block(hw: Cluster | str, dtype_bytes: int = 2, *, n_heads: int | None = None,
                       n_kv_heads: int | None = None, link: Link | None = None) -> float:
    """Smallest block of c tokens whose forward attention hides its K/V transfer (Liu et al. 2023, §3).

    A ring step attends c queries to c keys in each of the H query heads of dimension d: S = Q Kᵀ
    and S·V cost 2·c²·d FLOPs each, 4·c²·d·H in all, i.e. 4·c²·d·H / F seconds. Meanwhile the next
    K and V blocks — 2·c·d·H_kv elements of ``dtype_bytes`` (grouped-query attention sends only the
    H_kv = ``n_kv_heads`` K/V heads) — cross the link in 2·c·d·H_kv·dtype_bytes / B seconds. The
    transfer is hidden when 4·c²·d·H / F >= 2·c·d·H_kv·dtype_bytes / B, that is when

        c >= (H_kv / H) · dtype_bytes · F / (2·B)     (= (H_kv / H) · F/B for 16-bit K/V),

    independent of d (latency α is ignored). A100 NVLink, H_kv = H: 312e12 / 300e9 ≈ 1.0K tokens;
    Llama 3 (H = 64 or 32, H_kv = 8) needs a block 8× or 4× smaller. ``hw``: a ``Hardware`` or
    preset, or a ``Cluster`` (priced on its inter-node link, where a ring's transfers are slowest);
    ``link`` picks the link explicitly.
    """
    flops, bandwidth = _flops_and_bandwidth(hw, link)
    return _kv_fraction(n_heads, n_kv_heads) * dtype_bytes * flops / (2 * bandwidth)


def ring_overlap_block_backward(hw: Cluster | str, dtype_bytes: int = 2, *, grad_bytes: int = 4,
                                n_heads: int | None = None, n_kv_heads: int | None = None,
                                link: Link | None = None) -> float:
    """Smallest block of c tokens whose backward attention hides its ring transfer (``ring_attention``'s backward).

    The backward ring carries, per step, the K and V blocks (``dtype_bytes`` each element) *and* their
    dK, dV accumulators (``grad_bytes``; assumed fp32, 4 bytes, as ``ring_attention`` and
    flash-attention accumulate them, so that p partial sums are not rounded to 16 bits p times):
    2·c·d·H_kv·(dtype_bytes + grad_bytes) bytes. The step's compute recomputes S = Q Kᵀ and forms
    dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: five c×c×d matmuls per head, 10·c²·d·H FLOPs,
    2.5× the forward's four (torch's flop counter counts the same). Hidden when
    10·c²·d·H / F >= 2·c·d·H_kv·(dtype_bytes + grad_bytes) / B:

        c >= (H_kv / H) · (dtype_bytes + grad_bytes) · F / (5·B)    (= 1.2 · (H_kv / H) · F/B for bf16 K/V, fp32 dK/dV),

    1.2× the forward threshold: the backward moves 3× the bytes for 2.5× the FLOPs. With 16-bit
    accumulators it would be 0.8 · (H_kv / H) · F/B. ``hw`` and ``link`` as in ``ring_overlap_block``.
    """
    flops, bandwidth = _flops_and_bandwidth(hw, link)
    return _kv_fraction(n_heads, n_kv_heads) * (dtype_bytes + grad_bytes) * flops / (5 * bandwidth)


@dataclass(frozen=True)
class Estimate:
    """Predicted seconds of every call in a trace, keyed by the call's (rank, seq).

    Each rank's calls are summed as if they ran one after another (``ts.timeline`` also overlaps
    them with compute where the code does), except that point-to-point calls a rank posts together
    share its full-duplex links: a sendrecv's two halves, or isend/irecv calls posted one right
    after another with no other call and no wait between them (a ring shift). In such a group the
    sends leave one after another on the outgoing direction while the receives arrive on the
    incoming one, so the group takes max(Σ sends, Σ receives), each message α + n/B on the link
    between its two ranks. Per event: every send costs its α + n/B; the receives, in program order,
    cost only what they add beyond the group's sends, so that together they cost
    max(0, Σ receives − Σ sends). A ring shift of n bytes on one link is therefore α + n/B per rank
    (the send), its receive 0 s; across a node boundary (send on NVLink, receive over InfiniBand)
    the receive adds the difference, and the rank pays the slower direction.

    A receive posted alone (a blocking ``recv``, or an ``irecv`` with no send beside it) costs its
    full α + n/B: the rank waits that long, and ``ts.timeline`` shows the same. So a one-way
    transfer counts on both of its ranks, as a collective counts on every rank of its group, while
    each transfer of a ring shift counts once. Per rank, point-to-point seconds equal
    ``ts.timeline``'s communication time when the peers post their sides at the same moment (no
    compute, no idle); later posts that overlap an earlier group are still added, an upper bound.

    Filters take ``CommEvent`` fields, as in ``CommTrace.filter``, and the aggregates mean what they
    mean there: ``total`` is the sum over ranks, ``mean_per_rank`` one rank's share,
    ``max_per_rank`` the busiest rank, ``group_by`` a sum.
    """

    trace: CommTrace
    hardware: Cluster
    seconds: dict[tuple[int, int], float]

    def of(self, event: CommEvent) -> float:
        """Predicted seconds of one call of the trace."""
        return self.seconds[event.rank, event.seq]

    def total(self, **filters: Any) -> float:
        """Seconds of every matching call of every rank, added up (the sum over ranks; 0.0 if none)."""
        return float(self.trace.total(self.of, **filters))

    def per_rank(self, **filters: Any) -> dict[int, float]:
        """{rank: seconds of that rank's matching calls (0.0 if none)}, for every rank of the trace."""
        return {r: float(t) for r, t in self.trace.per_rank(self.of, **filters).items()}

    def mean_per_rank(self, **filters: Any) -> float:
        """One rank's share: ``total`` divided by the number of ranks."""
        return self.trace.mean_per_rank(self.of, **filters)

    def max_per_rank(self, **filters: Any) -> float:
        """Seconds of the busiest rank's matching calls (0.0 if none)."""
        return float(self.trace.max_per_rank(self.of, **filters))

    def group_by(self, key: Callable[[CommEvent], Any] | str | tuple[str, ...]) -> dict[Any, float]:
        """{key: seconds of every call of every rank with that key} (``CommTrace.group_by``), e.g.
        ``group_by(("scope", "phase"))``."""
        return self.trace.group_by(key, self.of)

    def rows(self) -> list[tuple[str, str, str, int, int, float]]:
        """``CommTrace.rows()`` with the predicted seconds per rank (the mean) in place of the bytes received."""
        seconds = self.group_by(("scope", "phase", "op"))
        n = len(self.trace.ranks) or 1
        return [(s, p, o, c, sb, seconds[s, p, o] / n) for s, p, o, c, sb, _ in self.trace.rows()]

    def table(self, fmt: str = "text") -> str:
        """Calls, bytes sent and predicted seconds per rank for each (scope, phase, op), and their total:
        "text", "markdown" or "html"."""
        rows = self.rows()
        body = [(s or "-", p, o, str(c), format_bytes(sb), format_seconds(t)) for s, p, o, c, sb, t in rows]
        total = ("total", "", "", str(sum(r[3] for r in rows)), format_bytes(sum(r[4] for r in rows)),
                 format_seconds(sum(r[5] for r in rows)))
        return Table(("scope", "phase", "op", "calls/rank", "sent/rank", "time/rank"), body,
                     frozenset({"calls/rank", "sent/rank", "time/rank"}), [total],
                     title=f"predicted on {self.hardware.name}, calls one after another "
                           "(a send and a receive posted together overlap)").render(fmt)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        return self.table("html")


def estimate(trace: CommTrace, hw: Cluster | str) -> Estimate:
    """Predicted time of every call of ``trace`` on ``hw`` (see ``Estimate``): a ``Cluster`` (or a key of
    ``CLUSTERS``) prices each call on its group's link (``Cluster.link_for``); a ``Hardware`` is one link.
    Pass the whole trace and filter the ``Estimate``: a receive is priced against the sends posted with it,
    so a trace filtered to receives alone prices each of them in full."""
    c = cluster(hw)
    seconds = {(e.rank, e.seq): event_time(e, c.link_for(e)) for e in trace.events}
    for group in _posted_together(trace):
        unused = sum(seconds[e.rank, e.seq] for e in group if e.op == "send")  # send time receives run under
        for e in (e for e in group if e.op == "recv"):
            alone = seconds[e.rank, e.seq]
            seconds[e.rank, e.seq] = max(0.0, alone - unused)
            unused = max(0.0, unused - alone)
    return Estimate(trace, c, seconds)


def _posted_together(trace: CommTrace) -> list[list[CommEvent]]:
    """Each rank's groups of point-to-point calls in flight at once (``Estimate``): a send or recv joins
    the call just before it (no other call or wait between) if that one did not block (an isend/irecv),
    or if it is the recv of a sendrecv (``batched``). Compute between them is not looked at."""
    groups: list[list[CommEvent]] = []
    for program in trace.programs().values():
        previous: CommEvent | None = None  # the point-to-point call just before, if any
        for item in program:
            if isinstance(item, ComputeSpan):
                continue
            if not (isinstance(item, CommEvent) and item.op in ("send", "recv")):
                previous = None
                continue
            if previous is not None and (not previous.blocking or item.batched):
                groups[-1].append(item)
            else:
                groups.append([item])
            previous = item
    return groups


def format_seconds(t: float) -> str:
    """Human-readable time: 0 s, 3.2 µs, 1.5 ms, 2.0 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(t) >= scale:
            return f"{t / scale:.1f} {unit}"
    return "0 s" if t == 0 else f"{t * 1e9:.1f} ns"
