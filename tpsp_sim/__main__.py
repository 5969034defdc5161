"""``python -m tpsp_sim report --out DIR``: run one transformer block under TP, TP+SP, ring and Ulysses
on the simulator, and write PNG plots and a Markdown table of bytes and predicted times."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from .analysis.cluster import cluster
from .analysis.cost import CLUSTERS, estimate
from .analysis.models import MODELS, Model
from .analysis.planner import IGNORES, PLANNED_RECOMPUTE, default_workers, plan, table as plan_table
from .context_parallel.registry import ATTENTIONS
from .viz.plan_plot import plot_plans
from .viz.plot import plot_comm, plot_scaling, plot_shards, plot_timeline
from .analysis.sweep import METHODS, Config, sweep, table


def report(out: Path, cfg: Config, world_sizes: list[int], seqs: list[int], hw: str, methods: list[str]) -> list[Path]:
    """Write the report's files into ``out``: bars and timelines for ``cfg``, and the scaling of
    every method with ``world_sizes`` (at ``cfg.seq``) and ``seqs`` (at ``cfg.world_size``)."""
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []

    def run_sweep(**over: list[int]) -> list:
        points, why = sweep(cfg, hw, methods, progress=lambda jobs: tqdm(jobs, desc="simulating", unit="run"), **over)
        skipped.extend(w for w in why if w not in skipped)
        return points

    by_ranks = run_sweep(world_sizes=world_sizes)  # at cfg.seq
    base = [p for p in by_ranks if p.world_size == cfg.world_size] or run_sweep()  # cfg itself
    other_seqs = [s for s in seqs if s != cfg.seq]
    by_seq = base + run_sweep(seqs=other_seqs) if other_seqs else []  # at cfg.world_size
    by_ranks = by_ranks if len(world_sizes) > 1 else []
    sizes = f"{cfg.batch}x{cfg.seq} tokens, hidden {cfg.hidden}, {cfg.heads} heads"
    figures = {"comm.png": plot_comm({p.method: p.trace for p in base},
                                     title=f"one block on {cfg.world_size} ranks, {sizes}"),
               "shards.png": plot_shards(8 * cfg.world_size, cfg.world_size)}
    if by_ranks:
        figures["scaling_world_size.png"] = plot_scaling(by_ranks, "world_size", title=f"one block, {sizes}")
    if by_seq:
        figures["scaling_seq.png"] = plot_scaling(by_seq, "seq", title=f"one block on {cfg.world_size} ranks")
    for p in base:
        figures[f"comm_{p.method}.png"] = plot_comm(p.trace, hw, title=f"{p.method}: one block per scope")
        figures[f"timeline_{p.method}.png"] = plot_timeline(
            p.timeline, title=f"{p.method}: one block on {cfg.world_size} ranks, {sizes}")
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)

    lines = [f"# Communication report: {cluster(hw).name}", "",
             f"One transformer block, forward and backward, {sizes}, on {cfg.world_size} ranks ({cfg.dtype}).",
             "Comm time counts transfers posted together once; exposed is the part not hidden behind compute.",
             "", table(base, hw), ""]
    for title, points in (("As the world size grows", by_ranks), ("As the sequence grows", by_seq)):
        if points:
            lines += [f"## {title}", "", table(points, hw), ""]
    for p in base:
        lines += [f"## {p.method}: calls per scope", "", estimate(p.trace, hw).table("markdown"), ""]
    if skipped:
        lines += ["## Skipped (sizes that do not divide)", "", *(f"- {why}" for why in skipped), ""]
    (out / "report.md").write_text("\n".join(lines))
    return [out / name for name in figures] + [out / "report.md"]


PLAN_DOC = """``python -m tpsp_sim plan --model llama3-8b --seq 131072 --gpus 64 --cluster dgx-h100``: rank every
TP x CP x DP split, attention kind and recompute mode by predicted step time, with the memory per GPU
(ts.plan); print a Markdown table and save a stacked bar plot."""


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to the ``commands`` of the top-level parser."""
    cmd = commands.add_parser("plan", help=PLAN_DOC.splitlines()[0], description=PLAN_DOC)
    cmd.add_argument("--model", default="llama3-8b", help=f"a preset ({', '.join(sorted(MODELS))}) or 'custom'")
    for flag in ("layers", "d-model", "heads", "kv-heads", "ffn", "vocab"):
        cmd.add_argument(f"--{flag}", type=int, help=f"with --model custom: the model's {flag.replace('-', ' ')}")
    cmd.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    cmd.add_argument("--gpus", type=int, required=True)
    cmd.add_argument("--cluster", default="dgx-h100", choices=sorted(CLUSTERS))
    cmd.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    cmd.add_argument("--global-batch-tokens", type=int, default=16 * 2**20, help="tokens per step (default 16M)")
    cmd.add_argument("--mfu", type=float, default=0.5, help="fraction of peak FLOP/s for all compute (default 0.5)")
    cmd.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=tuple(ATTENTIONS),
                     help="context-parallel attentions to try (default: all)")
    cmd.add_argument("--recompute", nargs="+", default=list(PLANNED_RECOMPUTE), choices=PLANNED_RECOMPUTE,
                     help="recompute modes to try (default: all)")
    cmd.add_argument("--workers", type=int, default=default_workers(),
                     help="processes for the layer simulations (default: one per CPU)")
    cmd.add_argument("--overlap-tp", action="store_true",
                     help="hide TP's backward reduce-scatters behind the weight-gradient matmuls (Megatron)")
    cmd.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    cmd.add_argument("--out", type=Path, default=Path("plan"), help="directory for plans.png (default ./plan)")


def plan_command(a: argparse.Namespace) -> list[str]:
    """Run the planner for the parsed ``plan`` arguments; the lines to print."""
    if a.model == "custom":
        sizes = (a.layers, a.d_model, a.heads, a.kv_heads or a.heads, a.ffn, a.vocab)
        if None in sizes:
            raise SystemExit("--model custom needs --layers --d-model --heads --ffn --vocab (and optionally --kv-heads)")
        model = Model("custom", *sizes)
    else:
        model = a.model
    plans = plan(model, a.seq, a.gpus, a.cluster, micro_batch=a.micro_batch, global_batch_tokens=a.global_batch_tokens,
                 mfu=a.mfu, attentions=a.attentions, recompute=a.recompute, overlap_tp=a.overlap_tp,
                 progress=lambda jobs: tqdm(jobs, desc="simulating one layer", unit="mesh"), workers=a.workers)
    a.out.mkdir(parents=True, exist_ok=True)
    figure = a.out / "plans.png"
    plot_plans(plans, title=f"{a.model}, {a.seq} tokens, {a.gpus} GPUs of {a.cluster}").savefig(figure, dpi=100)
    return [plan_table(plans, a.top), "", f"Ignored: {IGNORES}", "", str(figure)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tpsp_sim")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("report", help=__doc__.splitlines()[0], description=__doc__)
    cmd.add_argument("--world-size", type=int, nargs="+", default=[2, 4, 8],
                     help="ranks to sweep; the first is used for the bars and timelines (default: 2 4 8)")
    cmd.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                     help="sequence lengths to sweep; the first is used elsewhere (default: 4096 ... 32768)")
    cmd.add_argument("--batch", type=int, default=1)
    cmd.add_argument("--hidden", type=int, default=1024)
    cmd.add_argument("--heads", type=int, default=16)
    cmd.add_argument("--hardware", default="h100-nvlink", choices=sorted(CLUSTERS),
                     help="a one-link preset or a cluster (groups spanning nodes use its inter-node link)")
    cmd.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    cmd.add_argument("--device", default="meta", choices=("meta", "cpu"),
                     help="meta: shapes only, nothing computed (fast at any size); cpu: real tensors")
    cmd.add_argument("--out", type=Path, required=True, help="directory for the PNGs and report.md")
    add_plan_command(commands)
    a = parser.parse_args(argv)
    if a.command == "plan":
        for line in plan_command(a):
            print(line)
        return
    cfg = Config(world_size=a.world_size[0], seq=a.seq[0], batch=a.batch, hidden=a.hidden, heads=a.heads,
                 device=a.device)
    for path in report(a.out, cfg, a.world_size, a.seq, a.hardware, a.methods):
        print(path)


if __name__ == "__main__":
    main()
