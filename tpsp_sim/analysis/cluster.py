"""The one hardware type: a ``Cluster`` of nodes joined by ``Link``s; a single link is a one-level cluster.

``Link(name, bandwidth, latency, achieved, nvls, source)``: one GPU's link. ``bandwidth`` is the
datasheet (nominal) figure in bytes/s per direction, ``latency`` seconds per message (one ring
step), ``achieved`` the bus bandwidth NCCL measures on it (nccl-tests' "busbw": for a ring collective
the bytes one rank sends divided by the time, so it prices ``wire_bytes`` directly), and ``nvls`` the
all_reduce bus bandwidth with NVLink SHARP (NCCL's default on NVSwitch systems). ``busbw`` is what
a call is priced at: ``achieved`` where measured, else the nominal figure. ``Cluster.nominal()``
prices every link at its datasheet figure instead.

``Cluster(name, peak_flops, gpus_per_node, intra_node, inter_node, memory_bytes, source)``: global
rank r sits on node ``r // gpus_per_node``; ``gpus_per_node=None`` is a one-level cluster (one link
between every pair of ranks; ``Cluster.one_link(...)``, also known as ``ts.Hardware``).

Which bandwidth prices a call (``Cluster.link``, NCCL's rings):

* a collective whose group's ranks all share a node runs on the intra-node link (``nvls`` for an
  all_reduce where the link has it);
* a group that spans nodes runs as NCCL runs it: one ring per channel and one channel per NIC. With
  g of the group's ranks in each node (the fewest in any node), g rings run at once, each crossing
  the node boundary through a different GPU's NIC; every rank's NVLink carries all g rings' pieces.
  So the group's bus bandwidth is min(intra busbw, g · inter busbw) (g = 1: one GPU's NIC; the ring
  is as slow as its slowest hop); of its latency steps, those that cross a node boundary pay the
  inter-node latency and the others the intra-node one (``ts.cost``, as NCCL's tuning model). Two
  DGX H100 nodes, 16 ranks: min(370, 8 × 48) = 370 GB/s, as nccl-tests measures; one rank per node
  (a data-parallel group across nodes): 48 GB/s.
* a send / recv (ring attention's shifts) is one transfer over one GPU's link: the intra-node link if
  its two ranks share a node, else one NIC.

The link of a group that spans nodes also carries its ``NodeSpan`` (how many nodes, the most ranks in one,
its NICs, the two links): an all_reduce on it runs as NCCL's ring or its tree, whichever is faster
(``ts.cost.all_reduce_algorithm``), and a ring's steps inside a node pay the intra-node latency. Bandwidths are per GPU: a DGX gives each GPU its own InfiniBand
port (rail-optimised). A node with fewer NICs than GPUs gives each GPU its share
(``pcie-a100``: one port per 8 GPUs). Contention in the switches is ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable

from ..core.trace import CommEvent
from .presets import preset

GB = 1e9


@dataclass(frozen=True)
class NodeSpan:
    """A group across ``nodes`` nodes: at most ``node_ranks`` of its ranks in one node and at least ``nics`` (each
    rank's own NIC), over the cluster's ``intra`` and ``inter`` links: what NCCL's tree all_reduce runs on
    (``ts.cost``)."""

    nodes: int
    node_ranks: int
    nics: int
    intra: "Link"
    inter: "Link"


@dataclass(frozen=True)
class Link:
    """One GPU's link: ``bandwidth`` (nominal) and ``achieved`` (measured bus bandwidth, None: not measured)
    in bytes/s per direction, ``latency`` in seconds per message, ``nvls``: all_reduce bus bandwidth
    with NVLink SHARP (None: no NVLS), ``source``: where the numbers come from; ``span``: set by
    ``Cluster.link`` on the link of a group that spans nodes (None: the group shares one node or link)."""

    name: str
    bandwidth: float
    latency: float
    achieved: float | None = None
    nvls: float | None = None
    source: str = ""
    span: NodeSpan | None = None

    def __post_init__(self) -> None:
        for what in ("bandwidth", "achieved", "nvls"):
            value = getattr(self, what)
            if value is not None and not value > 0:
                raise ValueError(f"link {self.name!r}: {what} must be > 0 bytes/s, got {value}")
        if not self.latency >= 0:
            raise ValueError(f"link {self.name!r}: latency must be >= 0 s, got {self.latency}")

    @property
    def busbw(self) -> float:
        """The bandwidth calls are priced at: ``achieved`` where measured, else ``bandwidth``."""
        return self.bandwidth if self.achieved is None else self.achieved

    def bandwidth_of(self, op: str) -> float:
        """Bus bandwidth of ``op`` on this link: ``nvls`` for an all_reduce where set, else ``busbw``."""
        return self.nvls if op == "all_reduce" and self.nvls is not None else self.busbw

    def nominal(self) -> "Link":
        """This link priced at its datasheet figure (no achieved or NVLS bandwidth), its span's links too."""
        span = self.span and replace(self.span, intra=self.span.intra.nominal(), inter=self.span.inter.nominal())
        return replace(self, achieved=None, nvls=None, span=span)


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` GPUs (None: one level), an intra- and an inter-node link, and per-GPU
    ``peak_flops`` (dense 16-bit matmul) and ``memory_bytes``; ``source``: where the numbers come from."""

    name: str
    peak_flops: float
    gpus_per_node: int | None
    intra_node: Link
    inter_node: Link
    memory_bytes: float = math.inf
    source: str = ""

    def __post_init__(self) -> None:
        if self.gpus_per_node is not None and (int(self.gpus_per_node) != self.gpus_per_node or self.gpus_per_node < 1):
            raise ValueError(f"cluster {self.name!r}: gpus_per_node must be >= 1 or None, got {self.gpus_per_node}")
        if not self.peak_flops > 0 or not self.memory_bytes > 0:
            raise ValueError(f"cluster {self.name!r}: peak_flops and memory_bytes must be > 0, "
                             f"got {self.peak_flops} and {self.memory_bytes}")

    @classmethod
    def one_link(cls, name: str, link_bandwidth: float, latency: float, peak_flops: float,
                 memory_bytes: float = math.inf) -> "Cluster":
        """A one-level cluster: one link of ``link_bandwidth`` bytes/s and ``latency`` s between every pair."""
        link = Link(name, link_bandwidth, latency)
        return cls(name, peak_flops, None, link, link, memory_bytes)

    @property
    def link_bandwidth(self) -> float:
        """The one link's bandwidth (its ``busbw``) of a one-level cluster."""
        return self._one().busbw

    @property
    def latency(self) -> float:
        """The one link's latency of a one-level cluster."""
        return self._one().latency

    def _one(self) -> Link:
        if self.gpus_per_node is not None:
            raise ValueError(f"cluster {self.name!r} has two links (intra-node {self.intra_node.name}, inter-node "
                             f"{self.inter_node.name}): read .intra_node or .inter_node")
        return self.intra_node

    def nominal(self) -> "Cluster":
        """This cluster with every link at its datasheet bandwidth (``Link.nominal``)."""
        return replace(self, name=f"{self.name} (nominal)", intra_node=self.intra_node.nominal(),
                       inter_node=self.inter_node.nominal())

    def node(self, rank: int) -> int:
        """The node of global rank ``rank`` (0 on a one-level cluster)."""
        return 0 if self.gpus_per_node is None else rank // self.gpus_per_node

    def link(self, ranks: Iterable[int]) -> Link:
        """The link a collective among ``ranks`` runs on: the intra-node link if they share a node, else the
        NICs of the fewest of its ranks any node holds, g of them: min(intra busbw, g · inter busbw), with
        the group's ``NodeSpan``."""
        per_node = Counter(self.node(r) for r in ranks)
        if len(per_node) <= 1:
            return self.intra_node
        g = min(per_node.values())
        inter, intra = self.inter_node, self.intra_node
        span = NodeSpan(len(per_node), max(per_node.values()), g, intra, inter)
        if g == 1:
            return replace(inter, span=span)
        return Link(f"{g} x {inter.name}", min(intra.bandwidth, g * inter.bandwidth), inter.latency,
                    achieved=min(intra.busbw, g * inter.busbw), source=inter.source, span=span)

    def link_for(self, event: CommEvent) -> Link:
        """The link of one recorded call (a ``CommEvent``): its two ends for send / recv, else its group."""
        if event.op in ("send", "recv"):
            return self.link((event.rank, event.peer))
        return self.link(event.group)


GIB = 2**30

# ---- links -----------------------------------------------------------------------------------------
# Latencies are order-of-magnitude per-step NCCL latencies (a few µs inside a node, more across), not
# datasheet values. Bandwidths are per GPU and per direction.
NCCL_NVLINK = "https://github.com/NVIDIA/nccl-tests/issues/212"  # S. Jeaugey (NCCL): 370 GB/s ring busbw, ~480 NVLS
NVLINK4 = Link("NVLink 4", 450 * GB, 2e-6, achieved=370 * GB, nvls=480 * GB,
               source=f"H100 SXM5 datasheet: 900 GB/s both directions; achieved and NVLS: {NCCL_NVLINK}")
NVLINK5 = Link("NVLink 5", 900 * GB, 2e-6, achieved=740 * GB,
               source="B200 / GB200 datasheets: 1.8 TB/s both directions; achieved: NVLink 4's 370/450 ratio (not measured)")
NVLINK3 = Link("NVLink 3", 300 * GB, 2e-6, achieved=230 * GB,
               source="A100 SXM4 datasheet: 600 GB/s both directions; achieved: 8 x A100 SXM4 all_reduce busbw 230-250 GB/s, "
                      "https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests")
PCIE4 = Link("PCIe Gen4 x16", 31.5 * GB, 5e-6, source="PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s")
NCCL_HDR = "https://github.com/NVIDIA/nccl-tests/issues/119"  # 3 x 8 A100 40GB, 4 HDR per node: 96 of 100 GB/s busbw
IB_NDR = Link("InfiniBand NDR 400 Gb/s", 50 * GB, 5e-6, achieved=48 * GB,
              source=f"ConnectX-7 400 Gb/s = 50 GB/s; achieved 96%, as HDR measures in {NCCL_HDR}")
IB_HDR = Link("InfiniBand HDR 200 Gb/s", 25 * GB, 5e-6, achieved=24 * GB,
              source=f"ConnectX-6 200 Gb/s = 25 GB/s; achieved 96%: {NCCL_HDR}")
IB_HDR_SHARED_BY_8 = Link("InfiniBand HDR 200 Gb/s, one port per 8 GPUs", 25 * GB / 8, 5e-6,
                          source="one 200 Gb/s port shared by the 8 GPUs of a node when all of them cross at once")
IB_100G = Link("InfiniBand 100 Gb/s", 12.5 * GB, 5e-6,
               source="Liu et al. 2023 (Ring Attention): A100 hosts linked by 100 Gb/s InfiniBand")

# ---- GPUs: dense 16-bit FLOP/s and memory ------------------------------------------------------------
H100_FLOPS = 989e12  # H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (also H200)
A100_FLOPS = 312e12  # A100 datasheet: 312 TFLOP/s dense BF16
B200_FLOPS = 2.25e15  # DGX B200 datasheet: 72 PFLOP/s FP8 training for 8 GPUs = 2.25 PFLOP/s dense BF16 each
GB200_FLOPS = 2.5e15  # GB200 NVL72 datasheet: 180 PFLOP/s dense BF16 for 72 GPUs
GIB80 = 80 * GIB  # H100 SXM5 80 GB HBM3, A100 80 GB HBM2e: 80 GiB (nvidia-smi: 81,559 MiB)


def _one_level(name: str, peak_flops: float, link: Link) -> Cluster:
    """A one-link teaching preset: the link at its datasheet figure (``Link.nominal``)."""
    return Cluster(name, peak_flops, None, link.nominal(), link.nominal(), GIB80, link.source)


# One entry per preset, with its sources. The two-level clusters price with achieved bandwidths; the
# one-link presets (``h100-nvlink`` ...: the notebooks' alpha-beta examples) with datasheet figures.
CLUSTERS: dict[str, Cluster] = {
    "dgx-h100": Cluster("DGX H100", H100_FLOPS, 8, NVLINK4, IB_NDR, GIB80,
                        "DGX H100 user guide: 8 H100 SXM5 80 GB, NVSwitch, 8 ConnectX-7 400 Gb/s (one per GPU)"),
    "dgx-h200": Cluster("DGX H200", H100_FLOPS, 8, NVLINK4, IB_NDR, 141e9,
                        "DGX H200 datasheet: 8 H200 141 GB HBM3e, NVLink 4 through NVSwitch, 8 ConnectX-7 400 Gb/s"),
    "dgx-b200": Cluster("DGX B200", B200_FLOPS, 8, NVLINK5, IB_NDR, 180e9,
                        "DGX B200 datasheet: 8 B200 (1,440 GB HBM3e: 180 GB each), NVLink 5, 8 ConnectX-7 400 Gb/s"),
    "gb200-nvl72": Cluster("GB200 NVL72", GB200_FLOPS, 72, NVLINK5, IB_NDR, 186e9,
                           "GB200 NVL72 datasheet: 72 Blackwell GPUs in one NVLink 5 domain, 13.4 TB HBM3e "
                           "(186 GB each), one 400 Gb/s ConnectX-7 per GPU between racks"),
    "dgx-a100": Cluster("DGX A100", A100_FLOPS, 8, NVLINK3, IB_HDR, GIB80,
                        "DGX A100 user guide (640 GB system): 8 A100 SXM4 80 GB, NVSwitch, 8 ConnectX-6 200 Gb/s"),
    "dgx-a100-40gb": Cluster("DGX A100 40GB", A100_FLOPS, 8, NVLINK3, IB_HDR, 40 * GIB,
                             "DGX A100 user guide (320 GB system): 8 A100 SXM4 40 GB, NVSwitch, 8 ConnectX-6 200 Gb/s"),
    "pcie-a100": Cluster("8 x A100 PCIe Gen4", A100_FLOPS, 8, PCIE4, IB_HDR_SHARED_BY_8, GIB80,
                         "a generic 8 x A100 PCIe 80 GB server: GPUs talk over PCIe Gen4 x16, one HDR port per node"),
    "h100-nvlink": _one_level("H100 NVLink", H100_FLOPS, NVLINK4),
    "a100-nvlink": _one_level("A100 NVLink", A100_FLOPS, NVLINK3),
    "pcie-gen4": _one_level("A100 PCIe Gen4", A100_FLOPS, PCIE4),
    "ib-hdr": _one_level("A100 InfiniBand HDR", A100_FLOPS, IB_HDR),
    "ib-ndr": _one_level("H100 InfiniBand NDR", H100_FLOPS, IB_NDR),
    "a100-ib": _one_level("A100 InfiniBand 100 Gb/s", A100_FLOPS, IB_100G),
}


def cluster(hw: Cluster | str) -> Cluster:
    """The one place ``hw`` is normalised: a ``Cluster`` (a one-link ``ts.Hardware`` is one) as is, or a
    key of ``CLUSTERS``."""
    if isinstance(hw, Cluster):
        return hw
    if isinstance(hw, str):
        return preset(CLUSTERS, hw, "cluster")
    raise TypeError(f"hardware must be a Cluster (ts.Hardware(...) makes a one-link one) or a key of "
                    f"{sorted(CLUSTERS)}, got {type(hw).__name__}")
