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


def test_the_region_picture_puts_g_before_each_column_layer_and_g_bar_after_each_row_layer():
    from tpsp_sim.viz.splits import plot_regions, region

    assert region((2, 3, 48), seq=12, t=4) == "sequence" and region((2, 12, 12), seq=12, t=4) == "tensor"
    assert region((2, 12, 48), seq=12, t=1) == "tensor"  # one rank: nothing is a shard
    torch.manual_seed(0)
    block = ts.TransformerBlock(24, 6).double()

    def shapes(comm):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        seen = {}
        for name, m in p.named_modules():
            if name and not list(m.children()):
                def record(module, args, out, name=name):
                    seen[name] = (tuple(args[0].shape), tuple(out.shape))
                m.register_forward_hook(record)
        p(torch.zeros(2, 12 // comm.world_size, 24, dtype=torch.float64))
        return seen

    seen = ts.run(shapes, world_size=3).outputs[0]
    fig = plot_regions(seen, seq=12, t=3)
    marks = [text.get_text() for text in fig.axes[0].texts if text.get_text() in ("g", "ḡ")]
    assert marks == ["g", "ḡ", "g", "ḡ"]  # into qkv, out of proj, into fc1, out of fc2
