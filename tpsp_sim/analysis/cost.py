"""What communication costs on real hardware: the alpha-beta model of ring collectives.

A message of n bytes over a link of bandwidth B (bytes/s per direction) with latency α (s per
message) takes α + n/B. A ring collective on p ranks runs in p-1 steps (all_reduce in 2(p-1):
a reduce-scatter, then an all-gather), each rank sending one piece per step; the bytes a rank
sends over the whole call are exactly its wire bytes (``tpsp_sim.trace.wire_bytes``), so

    all_gather, reduce_scatter, all_to_all   α·(p-1)  + (p-1)/p·N/B    (all_gather: N = p·n, n its shard)
    all_reduce                               2α·(p-1) + 2(p-1)/p·N/B
    broadcast (pipelined ring)               α·(p-1)  + N/B
    send / recv                              α        + n/B
    barrier (an all_reduce of nothing)       2α·(p-1)

(Thakur, Rabenseifner & Gropp 2005; the nccl-tests "bus bandwidth" convention). The model ignores
contention and the switch topology: it is the time one rank's link is busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.ops import latency_steps, wire_bytes
from ..core.table import Table
from ..core.trace import CommEvent, CommTrace, format_bytes


@dataclass(frozen=True)
class Hardware:
    """One kind of link between ranks and the accelerators on its ends."""

    name: str
    link_bandwidth: float  # bytes/s per direction, one rank's link
    latency: float  # seconds per message (one ring step)
    peak_flops: float  # FLOP/s of one accelerator (dense 16-bit matmul)


# Bandwidths and FLOP/s are datasheet (nominal) numbers. Achieved bandwidth is lower: nccl-tests
# all_reduce on H100 NVLink measures ~370 of the nominal 450 GB/s; for achieved numbers use e.g.
# dataclasses.replace(H100_NVLINK, link_bandwidth=370e9). Latencies are order-of-magnitude per-step
# NCCL latencies (a few µs within a node, more across), not datasheet values.

# NVIDIA H100 SXM5 datasheet: NVLink 4 at 900 GB/s total (both directions), 989 TFLOP/s dense BF16.
H100_NVLINK = Hardware("H100 NVLink", link_bandwidth=450e9, latency=2e-6, peak_flops=989e12)
# NVIDIA A100 SXM4 datasheet: NVLink 3 at 600 GB/s total (both directions), 312 TFLOP/s dense BF16.
A100_NVLINK = Hardware("A100 NVLink", link_bandwidth=300e9, latency=2e-6, peak_flops=312e12)
# PCI Express 4.0 x16: 16 GT/s x 16 lanes, 128b/130b encoding = 31.5 GB/s per direction; A100 PCIe.
PCIE_GEN4 = Hardware("A100 PCIe Gen4", link_bandwidth=31.5e9, latency=5e-6, peak_flops=312e12)
# InfiniBand HDR (NVIDIA ConnectX-6): 200 Gb/s per port = 25 GB/s per direction; one per A100 (DGX A100).
INFINIBAND_HDR = Hardware("A100 InfiniBand HDR", link_bandwidth=25e9, latency=5e-6, peak_flops=312e12)
# InfiniBand NDR (NVIDIA ConnectX-7): 400 Gb/s per port = 50 GB/s per direction; one per H100 (DGX H100).
INFINIBAND_NDR = Hardware("H100 InfiniBand NDR", link_bandwidth=50e9, latency=5e-6, peak_flops=989e12)
# Liu et al. 2023 (Ring Attention): A100 hosts linked by 100 Gb/s InfiniBand, 12.5 GB/s (their ~24.5K-token block).
A100_INFINIBAND = Hardware("A100 InfiniBand 100 Gb/s", link_bandwidth=12.5e9, latency=5e-6, peak_flops=312e12)

PRESETS: dict[str, Hardware] = {
    "h100-nvlink": H100_NVLINK, "a100-nvlink": A100_NVLINK, "pcie-gen4": PCIE_GEN4,
    "ib-hdr": INFINIBAND_HDR, "ib-ndr": INFINIBAND_NDR, "a100-ib": A100_INFINIBAND,
}


def hardware(name: str | Hardware) -> Hardware:
    """A preset by its key in ``PRESETS`` (a ``Hardware`` is returned as is)."""
    if isinstance(name, Hardware):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]


def ring_steps(op: str, world_size: int) -> int:
    """Messages one rank pays the latency α for in ``op`` on ``world_size`` ranks (``ops.latency_steps``)."""
    return latency_steps(op, world_size)


def collective_time(op: str, nbytes: int, world_size: int, hw: Hardware | str) -> float:
    """Seconds one rank spends in ``op`` (alpha-beta, ring); ``nbytes`` is its input, as in ``CommEvent.nbytes``."""
    hw = hardware(hw)
    sent, received = wire_bytes(op, nbytes, world_size)  # broadcast: the root's share, N
    return ring_steps(op, world_size) * hw.latency + max(sent, received) / hw.link_bandwidth


def event_time(event: CommEvent, hw: Hardware | str) -> float:
    """``collective_time`` of one recorded call, on the group it ran on."""
    return collective_time(event.op, event.nbytes, len(event.group), hw)


def ring_overlap_block(hw: Hardware | str, dtype_bytes: int = 2) -> float:
    """Smallest block of c tokens whose attention compute hides its K/V transfer (Liu et al. 2023, eq. in §3).

    A ring step attends a block of c queries to a block of c keys: S = Q Kᵀ and S·V cost 2·c²·d
    FLOPs each, 4·c²·d in all, i.e. 4·c²·d / F seconds. Meanwhile the next K and V blocks
    (2·c·d elements of ``dtype_bytes``) cross the link in 2·c·d·dtype_bytes / B seconds. The
    transfer is hidden when 4·c²·d / F >= 2·c·d·dtype_bytes / B, that is when

        c >= dtype_bytes · F / (2·B)     (= F/B for 16-bit K/V),

    independent of the head dim d (latency α is ignored). A100 NVLink: 312e12 / 300e9 ≈ 1.0K tokens.
    """
    hw = hardware(hw)
    return dtype_bytes * hw.peak_flops / (2 * hw.link_bandwidth)


@dataclass(frozen=True)
class Estimate:
    """Predicted seconds of every call in a trace, keyed by the call's (rank, seq).

    Calls are summed as if they ran one after another (``ts.timeline`` overlaps them where the
    code does). Filters take ``CommEvent`` fields, as in ``CommTrace.filter``, and the aggregates
    mean what they mean there: ``total`` is the sum over ranks, ``mean_per_rank`` one rank's share,
    ``max_per_rank`` the busiest rank, ``group_by`` a sum.
    """

    trace: CommTrace
    hardware: Hardware
    seconds: dict[tuple[int, int], float]

    def of(self, event: CommEvent) -> float:
        """Predicted seconds of one call of the trace."""
        return self.seconds[event.rank, event.seq]

    def total(self, **filters: Any) -> float:
        """Seconds of every matching call of every rank, added up (the sum over ranks)."""
        return self.trace.total(self.of, **filters)

    def per_rank(self, **filters: Any) -> dict[int, float]:
        """{rank: seconds of that rank's matching calls}, for every rank of the trace."""
        return self.trace.per_rank(self.of, **filters)

    def mean_per_rank(self, **filters: Any) -> float:
        """One rank's share: ``total`` divided by the number of ranks."""
        return self.trace.mean_per_rank(self.of, **filters)

    def max_per_rank(self, **filters: Any) -> float:
        """Seconds of the busiest rank's matching calls (0.0 if none)."""
        return self.trace.max_per_rank(self.of, **filters)

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
                     title=f"predicted on {self.hardware.name}, calls one after another").render(fmt)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        return self.table("html")


def estimate(trace: CommTrace, hw: Hardware | str) -> Estimate:
    """Predicted time of every call of ``trace`` on ``hw`` (see ``Estimate``)."""
    hw = hardware(hw)
    return Estimate(trace, hw, {(e.rank, e.seq): event_time(e, hw) for e in trace.events})


def format_seconds(t: float) -> str:
    """Human-readable time: 0 s, 3.2 µs, 1.5 ms, 2.0 s."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(t) >= scale:
            return f"{t / scale:.1f} {unit}"
    return "0 s" if t == 0 else f"{t * 1e9:.1f} ns"
