"""``python -m tpsp_sim report`` writes its plots and a table whose bytes equal the closed forms."""

import subprocess
import sys

import pytest
import torch

from tpsp_sim.__main__ import main, report
from tpsp_sim.analysis.sweep import Config, record
from tpsp_sim.core.trace import format_bytes

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_writes_plots_and_a_markdown_table(tmp_path, capsys):
    out = tmp_path / "report"
    main(["report", "--world-size", "2", "4", "--seq", "32", "64", "--hidden", "16", "--heads", "4",
          "--hardware", "a100-nvlink", "--device", "cpu", "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    expected = {"comm.png", "shards.png", "scaling_world_size.png", "scaling_seq.png", "report.md"}
    expected |= {f"{kind}_{m}.png" for kind in ("comm", "timeline") for m in ("tp", "tp_sp", "ring", "ulysses", "allgather")}
    assert names == expected
    assert all((out / n).read_bytes()[:8] == PNG for n in names if n.endswith(".png"))
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "A100 NVLink" in md
    # TP, forward and backward: 4 all-reduces of b·s·h bf16 elements, 2(p-1)/p of each sent per rank.
    for p, s in ((2, 32), (4, 32), (2, 64)):
        sent = 4 * 2 * (p - 1) * (1 * s * 16 * 2) // p
        assert f"| tp | {p} | {s} | {format_bytes(sent)} |" in md
    # Ulysses: 4 all-to-alls forward and 4 backward, (p-1)/p of each b·s/p·h input, per micro-batch; and,
    # once per step, the all-reduce of the replicated block's weight gradients, 12h² + 13h = 3280 bf16
    # parameters, 2(p-1)/p of them sent: in a column of its own.
    row = next(line for line in md.splitlines() if line.startswith("| ulysses | 4 | 32 |")).split(" | ")
    assert row[3] == format_bytes(8 * 3 * (32 // 4 * 16 * 2) // 4) and row[6] == format_bytes(2 * 3 * 3280 * 2 // 4)


@pytest.mark.slow  # writes every figure
def test_report_of_a_world_size_outside_the_sweep_is_not_empty(tmp_path):
    """The bars, timelines and per-scope tables are of ``cfg`` even when the sweep leaves its world size out."""
    cfg = Config(world_size=2, seq=32, hidden=16, heads=4, dtype=torch.float32, device="meta")
    report(tmp_path, cfg, world_sizes=[4], seqs=[64], hw="a100-nvlink", methods=["tp"])
    md = (tmp_path / "report.md").read_text()
    assert "| tp | 2 | 32 |" in md and "| tp | 2 | 64 |" in md  # cfg itself, and at the other sequence
    assert "## tp: calls per scope" in md and (tmp_path / "timeline_tp.png").exists()


def test_report_lists_what_cannot_run(tmp_path, capsys):
    """Nothing runs: report.md says why each was skipped, no table and no figure, and the exit status is 1."""
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--world-size", "3", "--seq", "30", "--hidden", "16", "--heads", "4", "--methods", "tp",
              "ulysses", "--device", "cpu", "--out", str(tmp_path)])
    assert exit_.value.code == 1 and "Nothing runs: no method runs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "| method |" not in md
    assert "## Skipped" in md and "n_heads=4 is not divisible by the tensor-parallel size t=3" in md
    assert "ulysses on 3 ranks, seq 30" in md


@pytest.mark.slow
def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "tpsp_sim", "report", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "--world-size" in done.stdout and "--out" in done.stdout


@pytest.mark.parametrize("method", ["tp", "tp_sp", "ring", "ulysses"])
def test_meta_tensors_record_the_same_calls_as_real_ones(method):
    """The report runs on shapes only (device="meta"): it must move exactly the bytes real tensors move."""
    cfg = Config(world_size=2, seq=16, hidden=16, heads=2, dtype=torch.float32, device="cpu")
    real, meta = record(method, cfg), record(method, Config(**{**cfg.__dict__, "device": "meta"}))
    assert [(e.op, e.shape, e.sent_bytes, e.scope, e.phase) for e in meta.events] == \
           [(e.op, e.shape, e.sent_bytes, e.scope, e.phase) for e in real.events]
