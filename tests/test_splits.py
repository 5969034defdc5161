"""viz.splits: the ranks a picture colours are the ranks holding each row / column of the package's shards."""

from __future__ import annotations

import torch
from torch import nn

import tpsp_sim as ts
from tpsp_sim.viz.splits import owners, plot_qkv_heads, plot_tp_mlp


def test_owners_reads_rows_and_columns_back_from_the_shards():
    dense = torch.arange(24.0).reshape(4, 6)
    assert owners(dense, list(dense.chunk(2, 0)), 0) == [0, 0, 1, 1]
    assert owners(dense, list(dense.chunk(3, 1)), 1) == [0, 0, 1, 1, 2, 2]
    assert owners(dense, [dense[:1]], 0) == [0, -1, -1, -1]  # rows nobody holds


def test_the_pictures_colour_every_row_by_the_rank_holding_it():
    torch.manual_seed(0)
    qkv, fc1, fc2 = nn.Linear(12, 36), nn.Linear(4, 6), nn.Linear(6, 4)
    per_head = ts.run(lambda comm: ts.ColumnParallelLinear.from_dense(qkv, comm, stride=3).weight,
                      world_size=3).outputs
    fig = plot_qkv_heads(qkv.weight, {"naive": list(qkv.weight.chunk(3, 0)), "per head": per_head}, heads=6)
    assert len(fig.axes) == 2 and "t = 3" in fig.get_suptitle()
    colours = fig.axes[1].images[0].get_array()[0]  # one RGBA per row of [q | k | v]
    # per head: q heads 0-1 (rows 0-3) on rank 0, 2-3 on rank 1, 4-5 on rank 2; the same in k and v
    for part in range(3):
        for i in range(12):
            assert (colours[part * 12 + i] == colours[(i // 4) * 4]).all()
    assert len({tuple(colours[row]) for row in (0, 4, 8)}) == 3  # three ranks, three colours
    naive = fig.axes[0].images[0].get_array()[0]
    assert (naive[:12] == naive[0]).all() and not (naive[12] == naive[0]).all()  # all of q on rank 0
    shards = ts.run(lambda comm: (ts.ColumnParallelLinear.from_dense(fc1, comm).weight,
                                  ts.RowParallelLinear.from_dense(fc2, comm).weight), world_size=2).outputs
    assert len(plot_tp_mlp(fc1.weight, fc2.weight, [s[0] for s in shards], [s[1] for s in shards]).axes) == 1
