"""A cluster is two links: one inside a node, one between nodes. Each call is priced on its group's link.

``Link(name, bandwidth, latency)``: bytes/s per direction of one GPU's link, and seconds per message
(one ring step). ``Cluster(name, peak_flops, gpus_per_node, intra_node, inter_node, memory_bytes)``:
global rank r sits on node ``r // gpus_per_node``; ``gpus_per_node=None`` is a one-level cluster
(one link between every pair of ranks, today's ``Hardware`` presets).

Which link prices a call (``Cluster.link_for``):

* a collective whose group's ranks all share a node runs on the intra-node link;
* a group that spans nodes runs on the inter-node link, *even though most of its hops may be
  NVLink*. A ring collective moves in lockstep steps: in every step each rank sends one piece to its
  neighbour and the step ends when the slowest hop delivers. A ring through k ≥ 2 nodes has at least
  k hops that cross a node boundary, each carrying a full piece, so every step waits for an
  inter-node hop: the whole ring runs at the inter-node bandwidth and latency. (Hierarchical
  algorithms, NCCL's trees and NVLink SHARP can do better on some ops; this model ignores them.)
* a send / recv uses the intra-node link when its two ranks share a node, the inter-node link otherwise.

Bandwidths are per GPU: a DGX gives each GPU its own InfiniBand port (rail-optimised), so the
groups of different GPUs that cross nodes at the same time do not share a port. Contention in the
switches is ignored, as in ``cost``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..core.trace import CommEvent
from .presets import preset


@dataclass(frozen=True)
class Link:
    """One GPU's link: ``bandwidth`` in bytes/s per direction, ``latency`` in seconds per message."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` GPUs (None: one level), an intra- and an inter-node link, and per-GPU
    ``peak_flops`` (dense 16-bit matmul) and ``memory_bytes``."""

    name: str
    peak_flops: float
    gpus_per_node: int | None
    intra_node: Link
    inter_node: Link
    memory_bytes: float = math.inf

    def __post_init__(self) -> None:
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: gpus_per_node must be >= 1 or None, got {self.gpus_per_node}")

    def node(self, rank: int) -> int:
        """The node of global rank ``rank`` (0 on a one-level cluster)."""
        return 0 if self.gpus_per_node is None else rank // self.gpus_per_node

    def link(self, ranks: tuple[int, ...] | list[int]) -> Link:
        """The link a call among ``ranks`` runs on: intra-node if they share a node, else inter-node."""
        return self.intra_node if len({self.node(r) for r in ranks}) <= 1 else self.inter_node

    def link_for(self, event: CommEvent) -> Link:
        """The link of one recorded call (a ``CommEvent``): its two ends for send / recv, else its group."""
        if event.op in ("send", "recv"):
            return self.link((event.rank, event.peer))
        return self.link(event.group)


class _OneLink(Protocol):
    name: str
    link_bandwidth: float
    latency: float
    peak_flops: float


def one_level(hw: _OneLink, memory_bytes: float = math.inf) -> Cluster:
    """A ``Hardware`` (one link between all ranks) as a one-level cluster."""
    link = Link(hw.name, hw.link_bandwidth, hw.latency)
    return Cluster(hw.name, hw.peak_flops, None, link, link, memory_bytes)


# Datasheet (nominal) numbers; latencies are order-of-magnitude per-step NCCL latencies (a few µs
# inside a node, more across), not datasheet values. Bandwidths are per GPU and per direction.
H100_FLOPS = 989e12  # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16
A100_FLOPS = 312e12  # NVIDIA A100 datasheet: 312 TFLOP/s dense BF16
GIB80 = 80 * 2**30  # H100 SXM5 80 GB HBM3, A100 80 GB HBM2e: 80 GiB (nvidia-smi: 81,559 MiB)
# No reserve is taken off for the CUDA context (~0.5 GiB) or allocator fragmentation: ``ts.plan`` counts a
# plan that fills all 80 GiB as fitting, so one within a few GiB of the limit is optimistic.

# NVLink 4 (H100 SXM5 datasheet): 900 GB/s per GPU, both directions together.
NVLINK4 = Link("NVLink 4", 450e9, 2e-6)
# NVLink 3 (A100 SXM4 datasheet): 600 GB/s per GPU, both directions together.
NVLINK3 = Link("NVLink 3", 300e9, 2e-6)
# PCI Express 4.0 x16: 16 GT/s x 16 lanes, 128b/130b encoding = 31.5 GB/s per direction.
PCIE4 = Link("PCIe Gen4 x16", 31.5e9, 5e-6)
# InfiniBand NDR, ConnectX-7: 400 Gb/s per port = 50 GB/s per direction; DGX H100 has 8, one per GPU.
IB_NDR = Link("InfiniBand NDR 400 Gb/s", 50e9, 5e-6)
# InfiniBand HDR, ConnectX-6: 200 Gb/s per port = 25 GB/s per direction; DGX A100 has 8, one per GPU.
IB_HDR = Link("InfiniBand HDR 200 Gb/s", 25e9, 5e-6)
# An 8-GPU PCIe server with one HDR 200 Gb/s port for the whole node: 25 GB/s shared by 8 GPUs
# when all of them talk across nodes at once (as data- and context-parallel groups do): 3.125 GB/s each.
IB_HDR_SHARED_BY_8 = Link("InfiniBand HDR 200 Gb/s, one port per 8 GPUs", 25e9 / 8, 5e-6)
# Liu et al. 2023 (Ring Attention): A100 hosts linked by 100 Gb/s InfiniBand, 12.5 GB/s (their ~24.5K-token block).
IB_100G = Link("InfiniBand 100 Gb/s", 12.5e9, 5e-6)

# DGX H100 user guide: 8 H100 SXM5 80 GB, NVLink 4 through NVSwitch, 8 ConnectX-7 400 Gb/s NDR.
DGX_H100 = Cluster("DGX H100", H100_FLOPS, 8, NVLINK4, IB_NDR, GIB80)
# DGX A100 user guide (640 GB system): 8 A100 SXM4 80 GB, NVLink 3 through NVSwitch, 8 ConnectX-6 200 Gb/s HDR.
DGX_A100 = Cluster("DGX A100", A100_FLOPS, 8, NVLINK3, IB_HDR, GIB80)
# A generic 8 x A100 PCIe 80 GB server: GPUs talk over PCIe Gen4 x16, one HDR port per node.
PCIE_A100 = Cluster("8 x A100 PCIe Gen4", A100_FLOPS, 8, PCIE4, IB_HDR_SHARED_BY_8, GIB80)


def _one_level(name: str, peak_flops: float, link: Link) -> Cluster:
    return Cluster(name, peak_flops, None, link, link, GIB80)


CLUSTERS: dict[str, Cluster] = {
    "dgx-h100": DGX_H100,
    "dgx-a100": DGX_A100,
    "pcie-a100": PCIE_A100,
    # One link between every pair of ranks (``ts.cost.PRESETS`` are these, as ``Hardware``).
    "h100-nvlink": _one_level("H100 NVLink", H100_FLOPS, NVLINK4),
    "a100-nvlink": _one_level("A100 NVLink", A100_FLOPS, NVLINK3),
    "pcie-gen4": _one_level("A100 PCIe Gen4", A100_FLOPS, PCIE4),
    "ib-hdr": _one_level("A100 InfiniBand HDR", A100_FLOPS, IB_HDR),
    "ib-ndr": _one_level("H100 InfiniBand NDR", H100_FLOPS, IB_NDR),
    "a100-ib": _one_level("A100 InfiniBand 100 Gb/s", A100_FLOPS, IB_100G),
}


def cluster(hw: Cluster | _OneLink | str) -> Cluster:
    """A cluster: a ``Cluster`` as is, a ``Hardware`` as a one-level cluster, or a key of ``CLUSTERS``."""
    if isinstance(hw, Cluster):
        return hw
    if isinstance(hw, str):
        return preset(CLUSTERS, hw, "cluster")
    return one_level(hw)
