"""The saved-tensor meter, and a block's activation memory per rank against Korthikanti et al. 2022."""

import pytest
import torch

import tpsp_sim as ts


def test_meter_counts_each_storage_once_and_skips_excluded_ones():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with ts.saved_tensor_meter() as everything, ts.saved_tensor_meter(exclude=[w]) as activations:
        y = x @ w        # saves x and w
        z = y[:, :4] * y[:, 4:]  # saves two views of y: one storage
        (z.sum() * x.sum()).backward()  # meters see only what is saved while they are open
    assert everything.nbytes == (4 * 8 + 8 * 8 + 4 * 8 + 1 + 1) * 4  # x, w, y (once), z.sum(), x.sum()
    assert activations.nbytes == everything.nbytes - w.numel() * 4
    with ts.saved_tensor_meter() as after:
        pass
    assert after.nbytes == 0


def test_meter_is_per_rank():
    def fn(comm):
        x = torch.randn(comm.rank + 1, 10, dtype=torch.float64, requires_grad=True)
        with ts.saved_tensor_meter() as meter:
            x.exp()  # saves its output
        return meter.nbytes

    with ts.saved_tensor_meter() as outside:
        outs = ts.run(fn, world_size=3).outputs
    assert outs == [80, 160, 240]
    assert outside.nbytes == 0


def measure(mode, t, s, b, h, a):
    """Bytes saved for backward per rank by one block in bfloat16, dropout on, d_ff = 4h (parameters excluded)."""
    torch.manual_seed(0)
    block = ts.TransformerBlock(h, a, dropout=0.1, attn_dropout=0.1).to(torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16)
    if mode == "none":
        with ts.saved_tensor_meter(exclude=block.manual_seed(0).parameters()) as meter:
            block(x.requires_grad_())
        return [meter.nbytes]

    def fn(comm):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, mode)
        xi = (ts.shard_sequence(x, comm.rank, t, dim=1) if mode == "tp_sp" else x.clone()).requires_grad_()
        with ts.saved_tensor_meter(exclude=p.parameters()) as meter:
            p(xi)
        return meter.nbytes

    return ts.run(fn, world_size=t).outputs


@pytest.mark.parametrize("s, b, h, a", [(64, 2, 64, 4), (32, 3, 96, 8)])
@pytest.mark.parametrize("mode, t", [("none", 1), ("tp", 2), ("tp", 4), ("tp_sp", 2), ("tp_sp", 4)])
def test_activation_memory_per_rank_matches_korthikanti(mode, t, s, b, h, a):
    paper = ts.activation_memory(mode, s, b, h, a, t)
    measured = measure(mode, t, s, b, h, a)
    assert len(set(measured)) == 1, "every rank saves the same"
    assert abs(measured[0] - paper) <= 0.10 * paper
    # the whole difference is the LayerNorms' mean and rstd (memory.py's docstring, term by term)
    layernorm_stats = 2 * 2 * b * s * 2 // (t if mode == "tp_sp" else 1)
    assert measured[0] == paper + layernorm_stats


def test_sequence_parallelism_divides_all_activations_by_t_and_tp_alone_does_not():
    s, b, h, a = 64, 2, 64, 4
    none = measure("none", 1, s, b, h, a)[0]
    assert measure("tp_sp", 4, s, b, h, a)[0] * 4 == none
    assert measure("tp", 4, s, b, h, a)[0] * 4 > none  # the 10sbh of LayerNorms and dropouts stay whole


def test_formulas():
    s, b, h, a = 128, 2, 256, 8
    assert ts.activation_memory("none", s, b, h, a) == ts.activation_memory("tp", s, b, h, a, 1) \
        == ts.activation_memory("tp_sp", s, b, h, a, 1) == s * b * h * 34 + 5 * a * s * s * b
    assert ts.activation_memory("tp", s, b, h, a, 8) == s * b * h * 10 + (24 * s * b * h + 5 * a * s * s * b) / 8
    with pytest.raises(ValueError, match="mode must be one of"):
        ts.activation_memory("sp", s, b, h, a)
