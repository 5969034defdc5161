"""``python -m tpsp_sim report`` / ``plan``: bad flags fail at parse time (one line, exit status 2, nothing
written); every flag is honoured or rejected; nothing fitting is a headline and exit status 1; figures
are written whole or not at all."""

import argparse

import pytest
from matplotlib.figure import Figure

from tpsp_sim.__main__ import _plan_model, add_plan_command, main, save_figure
from tpsp_sim.analysis.models import MODELS

TINY = ["--model", "custom", "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
        "--vocab", "100", "--seq", "256", "--global-batch-tokens", "512"]


def fails_to_parse(argv, capsys, match):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert match in err and err.strip().splitlines()[-1].count(match) == 1, err
    return err


@pytest.mark.parametrize("flags, match", [
    (["--world-size", "0"], "--world-size: 0 must be >= 1"),
    (["--world-size", "4", "-2"], "--world-size: -2 must be >= 1"),
    (["--seq", "0"], "--seq: 0 must be >= 1"),
    (["--heads", "0"], "--heads: 0 must be >= 1"),
    (["--hidden", "0"], "--hidden: 0 must be >= 1"),
    (["--batch", "-1"], "--batch: -1 must be >= 1"),
    (["--batch", "two"], "--batch: 'two' is not an integer"),
])
def test_report_rejects_sizes_below_one_before_writing_anything(tmp_path, capsys, flags, match):
    out = tmp_path / "report"
    fails_to_parse(["report", *flags, "--out", str(out)], capsys, match)
    assert not out.exists()


@pytest.mark.parametrize("flags, match", [
    (["--gpus", "0"], "--gpus: 0 must be >= 1"),
    (["--gpus", "-8"], "--gpus: -8 must be >= 1"),
    (["--gpus", "2", "--mfu", "0"], "--mfu: 0 must be > 0.0 and <= 1.0"),
    (["--gpus", "2", "--mfu", "-1"], "--mfu: -1 must be > 0.0 and <= 1.0"),
    (["--gpus", "2", "--mfu", "1.5"], "--mfu: 1.5 must be > 0.0 and <= 1.0"),
    (["--gpus", "2", "--micro-batch", "0"], "--micro-batch: 0 must be >= 1"),
    (["--gpus", "2", "--top", "-3"], "--top: -3 must be >= 1"),
    (["--gpus", "2", "--workers", "0"], "--workers: 0 must be >= 1"),
    (["--gpus", "2", "--head-dim", "0"], "--head-dim: 0 must be >= 1"),
    (["--gpus", "2", "--reserve-gib", "-1"], "--reserve-gib: -1 must be >= 0.0"),
    (["--gpus", "2", "--zero", "4"], "--zero: invalid choice: 4"),
    (["--gpus", "2", "--cluster", "dgx-a100", "--cluster-file", "c.toml"], "not allowed with argument --cluster"),
])
def test_plan_rejects_bad_numbers_at_parse_time(tmp_path, capsys, flags, match):
    fails_to_parse(["plan", *TINY, *flags, "--out", str(tmp_path / "plan")], capsys, match)
    assert not (tmp_path / "plan").exists()


def test_plan_checks_the_output_directory_before_simulating(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails_to_parse(["plan", *TINY, "--gpus", "2", "--out", str(blocker / "plan")], capsys, f"--out {blocker / 'plan'}")
    assert "simulating" not in capsys.readouterr().err


def test_plan_with_a_custom_model_needs_its_sizes(tmp_path, capsys):
    fails_to_parse(["plan", "--model", "custom", "--layers", "2", "--seq", "64", "--gpus", "1", "--out",
                    str(tmp_path)], capsys, "--model custom needs --d-model --heads --ffn --vocab")


def parse_plan(argv):
    parser = argparse.ArgumentParser()
    add_plan_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv]), parser


def test_size_flags_override_a_preset_and_head_dim_is_honoured():
    a, parser = parse_plan(["--model", "llama3-8b", "--layers", "40", "--head-dim", "64", "--seq", "64", "--gpus", "1"])
    m = _plan_model(parser, a)
    assert (m.n_layers, m.head_dim, m.d_model, m.vocab) == (40, 64, 4096, MODELS["llama3-8b"].vocab)


def test_cluster_and_model_files(tmp_path, capsys):
    (tmp_path / "model.toml").write_text('name = "toml tiny"\nn_layers = 2\nd_model = 64\nn_heads = 4\n'
                                         'n_kv_heads = 2\nd_ff = 128\nvocab = 100\n')
    (tmp_path / "cluster.toml").write_text(
        'name = "toml pairs"\npeak_flops = 1e12\ngpus_per_node = 2\nmemory_bytes = 1e9\n'
        '[intra_node]\nname = "fast"\nbandwidth = 1e9\nlatency = 1e-6\n'
        '[inter_node]\nname = "slow"\nbandwidth = 1e8\nlatency = 1e-5\nachieved = 9e7\n')
    main(["plan", "--model-file", str(tmp_path / "model.toml"), "--cluster-file", str(tmp_path / "cluster.toml"),
          "--seq", "256", "--gpus", "2", "--global-batch-tokens", "512", "--workers", "1", "--reserve-gib", "0",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("Best: ") and "toml tiny, 256 tokens, 2 GPUs of toml pairs" in out
    (tmp_path / "bad.toml").write_text('name = "x"\npeak_flops = 1e12\nbandwidth = 3\n')
    fails_to_parse(["plan", *TINY, "--gpus", "2", "--cluster-file", str(tmp_path / "bad.toml"), "--out",
                    str(tmp_path)], capsys, "--cluster-file")


def test_report_takes_a_cluster_file(tmp_path, capsys):
    """The report prices its calls on the file's cluster (its name heads report.md); --hardware is the other way
    to name one, not both; a file that is not a cluster is a usage error naming the flag."""
    (tmp_path / "cluster.toml").write_text(
        'name = "toml quads"\npeak_flops = 1e12\ngpus_per_node = 4\nmemory_bytes = 1e9\n'
        '[intra_node]\nname = "fast"\nbandwidth = 1e9\nlatency = 1e-6\n'
        '[inter_node]\nname = "slow"\nbandwidth = 1e8\nlatency = 1e-5\n')
    out = tmp_path / "out"
    main(["report", "--world-size", "2", "--seq", "256", "--hidden", "64", "--heads", "4", "--methods", "tp",
          "--cluster-file", str(tmp_path / "cluster.toml"), "--out", str(out)])
    assert (out / "report.md").read_text().startswith("# Communication report: toml quads")
    fails_to_parse(["report", "--hardware", "h100-nvlink", "--cluster-file", str(tmp_path / "cluster.toml"),
                    "--out", str(out)], capsys, "not allowed with argument --hardware")
    (tmp_path / "bad.toml").write_text('name = "x"\npeak_flops = 1e12\nbandwidth = 3\n')
    fails_to_parse(["report", "--cluster-file", str(tmp_path / "bad.toml"), "--out", str(out)], capsys,
                   "--cluster-file")


def test_nothing_fits_is_a_headline_and_exit_status_one_without_a_figure(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--gpus", "2", "--cluster", "dgx-a100-40gb", "--model", "llama3-70b",
              "--seq", "131072", "--global-batch-tokens", "262144", "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and out.startswith("Nothing fits: no split of Llama 3 70B")
    assert not (tmp_path / "plans.png").exists()


def test_a_batch_that_does_not_split_over_dp_says_so_once_per_mesh():
    """4 sequences on 6 GPUs: dp = 3 and dp = 6 cannot take them; each such mesh is one row, not one per
    attention kind and recompute mode."""
    from tpsp_sim.analysis.planner import plan
    from tpsp_sim.analysis.models import Model
    import tpsp_sim as ts
    tiny = Model("tiny", 2, 64, 4, 2, 128, 100)
    pairs = ts.cost.Cluster("pairs", 1e12, 2, ts.cost.Link("fast", 1e9, 1e-6), ts.cost.Link("slow", 1e8, 1e-5), 1e9)
    plans = plan(tiny, 256, 6, pairs, global_batch_tokens=4 * 256, reserve=0, attentions=("ring", "ulysses"),
                 recompute=("selective",))
    rows = [p for p in plans if (p.dp, p.cp, p.tp) == (3, 1, 2)]
    assert len(rows) == 1 and rows[0].why == "the batch of 4 sequences does not split into dp=3 × micro_batch=1"
    assert (rows[0].attention, rows[0].recompute) == ("-", "-") and not rows[0].fits


def test_an_interrupted_figure_write_leaves_no_file(tmp_path):
    class Interrupted(Figure):
        def savefig(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_figure(Interrupted(), tmp_path / "comm.png")
    assert list(tmp_path.iterdir()) == []
    save_figure(Figure(), tmp_path / "comm.png")
    assert [p.name for p in tmp_path.iterdir()] == ["comm.png"]
    assert (tmp_path / "comm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_searches_overlap_and_micro_batches_from_the_shell(tmp_path, capsys, monkeypatch):
    """--overlap-tp alone is on, 'both' tries off and on; --micro-batch takes several sizes: each reaches plan()
    as the iterable it searches, and the headline says which the best plan uses."""
    import tpsp_sim.__main__ as cli
    seen = {}
    real = cli.plan

    def spy(*args, **kwargs):
        seen.update(overlap_tp=kwargs["overlap_tp"], micro_batch=kwargs["micro_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "plan", spy)
    for flags, overlap in ((["--overlap-tp"], (True,)), (["--overlap-tp", "both"], (False, True)), ([], (False,))):
        main(["plan", *TINY, "--gpus", "2", "--micro-batch", "1", "2", "--attentions", "ring", "--recompute",
              "selective", "--workers", "1", "--reserve-gib", "0", *flags, "--out", str(tmp_path)])
        headline = capsys.readouterr().out.splitlines()[0]
        assert seen == {"overlap_tp": overlap, "micro_batch": [1, 2]}
        assert ", micro-batch " in headline and (", TP overlap " in headline) == bool(flags), headline
    fails_to_parse(["plan", *TINY, "--gpus", "2", "--overlap-tp", "maybe", "--out", str(tmp_path)], capsys,
                   "--overlap-tp: invalid choice: 'maybe'")
