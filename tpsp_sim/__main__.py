"""``python -m tpsp_sim report --out DIR``: run one transformer block under TP, TP+SP, ring and Ulysses
on the simulator, and write PNG plots and a Markdown table of bytes and predicted times."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib
from matplotlib.figure import Figure
from tqdm import tqdm

from .analysis.cluster import CLUSTERS, Cluster, Link, cluster
from .analysis.cost import estimate, format_seconds
from .analysis.memory import RESERVE_BYTES, ZERO_STAGES
from .analysis.models import MODELS, Model
from .analysis.planner import (IGNORES, PLANNED_RECOMPUTE, PROCESSES_FROM, default_workers, fewest_gpus, plan,
                               table as plan_table)
from .context_parallel.registry import ATTENTIONS
from .viz.plan_plot import plot_plans
from .viz.plot import plot_comm, plot_scaling, plot_shards, plot_timeline
from .analysis.sweep import Config, all_methods, sweep, table


class NothingRuns(Exception):
    """Every configuration of a report was skipped (its sizes do not divide)."""


def report(out: Path, cfg: Config, world_sizes: list[int], seqs: list[int], hw: Cluster | str,
           methods: list[str]) -> list[Path]:
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
    skipped_md = ["## Skipped (sizes that do not divide)", "", *(f"- {why}" for why in skipped), ""] if skipped else []
    if not base:  # no table, no figure: say why and fail
        (out / "report.md").write_text("\n".join([f"# Communication report: {cluster(hw).name}", "",
                                                  f"Nothing runs on {cfg.world_size} ranks, {sizes}.", "",
                                                  *skipped_md]))
        raise NothingRuns(f"no method runs {sizes} on {cfg.world_size} ranks; why each was skipped: {out / 'report.md'}")
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
        save_figure(fig, out / name)

    lines = [f"# Communication report: {cluster(hw).name}", "",
             f"One transformer block, forward and backward, {sizes}, on {cfg.world_size} ranks ({cfg.dtype}).",
             "Comm time counts transfers posted together once; exposed is the part not hidden behind compute.",
             "", table(base, hw), ""]
    for title, points in (("As the world size grows", by_ranks), ("As the sequence grows", by_seq)):
        if points:
            lines += [f"## {title}", "", table(points, hw), ""]
    for p in base:
        lines += [f"## {p.method}: calls per scope", "", estimate(p.trace, hw).table("markdown"), ""]
    (out / "report.md").write_text("\n".join(lines + skipped_md))
    return [out / name for name in figures] + [out / "report.md"]


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG to a temporary file beside ``path``, then rename it: an interrupted write
    leaves no truncated ``path`` (the rename is atomic on one file system)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            fig.savefig(file, dpi=100, format="png")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a ``kind`` number >= ``low`` (> when ``low_open``) and <= ``high``, else a one-line error."""
    bounds = (f"> {low}" if low_open else f">= {low}") + (f" and <= {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value

    parse.__name__ = f"{kind.__name__} {bounds}"
    return parse


POSITIVE = _number(int, 1)
FRACTION = _number(float, 0.0, 1.0, low_open=True)


def _writable_directory(parser: argparse.ArgumentParser, out: Path) -> None:
    """Create ``out`` (and its parents) and check a file can be written there, before any simulation runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot write there ({error.strerror or error})")


def _load_toml(parser: argparse.ArgumentParser, flag: str, path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        parser.error(f"{flag} {path}: {error}")


def _cluster_arg(parser: argparse.ArgumentParser, path: Path | None, preset: str) -> Cluster:
    """The cluster of ``--cluster-file`` if given (a usage error if it is not one), else the preset's."""
    if path is None:
        return CLUSTERS[preset]
    try:
        return cluster_from_toml(_load_toml(parser, "--cluster-file", path))
    except (TypeError, ValueError) as error:
        parser.error(f"--cluster-file {path}: {error}")


def cluster_from_toml(table: dict) -> Cluster:
    """A ``Cluster`` from a TOML table: name, peak_flops, gpus_per_node (omit: one level), memory_bytes,
    source, and [intra_node] / [inter_node] tables of ``Link`` fields (name, bandwidth, latency, achieved,
    nvls, source); a one-level cluster may give a single [link]."""
    fields = dict(table)
    links = {key: Link(**fields.pop(key)) for key in ("intra_node", "inter_node", "link") if key in fields}
    if "link" in links:
        links["intra_node"] = links["inter_node"] = links.pop("link")
    return Cluster(**{"gpus_per_node": None, **fields, **links})


def model_from_toml(table: dict) -> Model:
    """A ``Model`` from a TOML table of its fields (name, n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab,
    and optionally mlp, tied_embeddings, head_dim)."""
    return Model(**table)


PLAN_DOC = """``python -m tpsp_sim plan --model llama3-8b --seq 131072 --gpus 64 --cluster dgx-h100``: rank every
PP x DP x CP x TP split, attention kind, recompute mode and ZeRO stage by predicted step time, with the memory per GPU
(ts.plan); print a Markdown table and save a stacked bar plot."""


OVERLAP_TP = {"off": (False,), "on": (True,), "both": (False, True)}  # --overlap-tp: plan(overlap_tp=...)
MODEL_FLAGS = {"layers": "n_layers", "d_model": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
               "ffn": "d_ff", "vocab": "vocab", "head_dim": "head_dim"}  # flag (as argparse names it): Model field


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to the ``commands`` of the top-level parser."""
    cmd = commands.add_parser("plan", help=PLAN_DOC.splitlines()[0], description=PLAN_DOC)
    models = cmd.add_mutually_exclusive_group()
    models.add_argument("--model", default="llama3-8b",
                        help=f"a preset ({', '.join(sorted(MODELS))}) or 'custom' (give every size below)")
    models.add_argument("--model-file", type=Path, help="a TOML file of Model fields (instead of --model)")
    for flag, field in MODEL_FLAGS.items():
        cmd.add_argument(f"--{flag.replace('_', '-')}", type=POSITIVE,
                         help=f"the model's {field} (overrides the preset's; required with --model custom)")
    cmd.add_argument("--seq", type=POSITIVE, required=True, help="tokens per sequence")
    cmd.add_argument("--gpus", type=POSITIVE, required=True)
    clusters = cmd.add_mutually_exclusive_group()
    clusters.add_argument("--cluster", default="dgx-h100", choices=sorted(CLUSTERS))
    clusters.add_argument("--cluster-file", type=Path, help="a TOML file of Cluster fields (instead of --cluster)")
    cmd.add_argument("--micro-batch", type=POSITIVE, nargs="+", default=[1],
                     help="sequences per micro-batch, one or several sizes to try (default 1)")
    cmd.add_argument("--global-batch-tokens", type=POSITIVE, default=16 * 2**20, help="tokens per step (default 16M)")
    cmd.add_argument("--mfu", type=FRACTION, default=0.5, help="fraction of peak FLOP/s for all compute (default 0.5)")
    cmd.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=tuple(ATTENTIONS),
                     help="context-parallel attentions to try (default: all)")
    cmd.add_argument("--recompute", nargs="+", default=list(PLANNED_RECOMPUTE), choices=PLANNED_RECOMPUTE,
                     help="recompute modes to try (default: all)")
    cmd.add_argument("--workers", type=POSITIVE, default=None,
                     help=f"processes for the layer simulations (default: one per CPU ({default_workers()}) when "
                          f"{PROCESSES_FROM} or more are to run, else 1: spawning costs more than a small search)")
    cmd.add_argument("--zero", type=int, nargs="+", default=[1], choices=ZERO_STAGES,
                     help="ZeRO stages over dp x cp to try (default 1: Megatron's distributed optimizer)")
    for axis in ("pp", "dp", "cp", "tp"):
        cmd.add_argument(f"--{axis}", type=POSITIVE, help=f"fix the {axis} size (default: search every divisor)")
    cmd.add_argument("--max-pp", type=POSITIVE, help="largest pipeline size to try")
    cmd.add_argument("--max-tp", type=POSITIVE, help="largest tensor-parallel size to try")
    cmd.add_argument("--tp-within-node", action="store_true", help="keep every tp group inside one node")
    cmd.add_argument("--virtual-stages", type=POSITIVE, nargs="+", default=[1, 2],
                     help="model chunks per pipeline rank to try (> 1: interleaved 1F1B; default: 1 2)")
    cmd.add_argument("--grad-dtype", default="fp32", choices=("fp32", "bf16"),
                     help="gradient bytes (default fp32: Megatron's main gradients)")
    cmd.add_argument("--reserve-gib", type=_number(float, 0.0), default=RESERVE_BYTES / 2**30,
                     help=f"GiB per GPU kept for the CUDA context and NCCL (default {RESERVE_BYTES / 2**30:g})")
    cmd.add_argument("--overlap-tp", nargs="?", const="on", default="off", choices=tuple(OVERLAP_TP),
                     help="overlap TP's communication with its GEMMs (Megatron's --tp-comm-overlap): off (default), "
                          "on (the flag alone) or both to try")
    cmd.add_argument("--top", type=POSITIVE, default=20, help="rows of the table (default 20)")
    cmd.add_argument("--out", type=Path, default=Path("plan"), help="directory for plans.png (default ./plan)")


def _plan_model(parser: argparse.ArgumentParser, a: argparse.Namespace) -> Model:
    """The model the ``plan`` flags name: a preset, a TOML file or 'custom', with the size flags applied."""
    given = {field: getattr(a, flag) for flag, field in MODEL_FLAGS.items() if getattr(a, flag) is not None}
    try:
        if a.model_file is not None:
            base = model_from_toml(_load_toml(parser, "--model-file", a.model_file))
        elif a.model == "custom":
            needed = ("n_layers", "d_model", "n_heads", "d_ff", "vocab")
            missing = [f"--{flag.replace('_', '-')}" for flag, field in MODEL_FLAGS.items() if field in needed
                       and field not in given]
            if missing:
                parser.error(f"--model custom needs {' '.join(missing)}")
            return Model("custom", **{"n_kv_heads": given.get("n_heads"), **given})
        elif a.model in MODELS:
            base = MODELS[a.model]
        else:
            parser.error(f"--model: unknown model {a.model!r}; presets are {sorted(MODELS)} or 'custom'")
        if "head_dim" not in given and {"d_model", "n_heads"} & given.keys():
            given["head_dim"] = 0  # derive it again from the new d_model / n_heads
        return dataclasses.replace(base, **given) if given else base
    except (TypeError, ValueError) as error:
        parser.error(f"model: {error}")


def plan_command(a: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> tuple[list[str], int]:
    """Run the planner for the parsed ``plan`` arguments; (the lines to print, the exit status: 0 if some
    plan fits, 1 if none does)."""
    parser = parser or argparse.ArgumentParser(prog="python -m tpsp_sim plan")
    model = _plan_model(parser, a)
    hw = _cluster_arg(parser, a.cluster_file, a.cluster)
    _writable_directory(parser, a.out)  # before the simulations, not after
    try:
        plans = plan(model, a.seq, a.gpus, hw, micro_batch=a.micro_batch, global_batch_tokens=a.global_batch_tokens,
                     mfu=a.mfu, attentions=a.attentions, recompute=a.recompute, overlap_tp=OVERLAP_TP[a.overlap_tp],
                     zero=a.zero, grad_dtype=a.grad_dtype, reserve=a.reserve_gib * 2**30, pp=a.pp, dp=a.dp,
                     cp=a.cp, tp=a.tp, max_pp=a.max_pp, max_tp=a.max_tp, tp_within_node=a.tp_within_node,
                     virtual_stages=a.virtual_stages,
                     progress=lambda jobs: tqdm(jobs, desc="simulating one layer", unit="mesh"), workers=a.workers)
    except ValueError as error:
        parser.error(str(error))
    heading = f"{model.name}, {a.seq} tokens, {a.gpus} GPUs of {hw.name}"
    lines = [plan_table(plans, a.top), "", f"Ignored: {IGNORES}", ""]
    if not any(p.fits for p in plans):
        fewest = fewest_gpus(model, a.seq, hw, gpus=a.gpus, micro_batch=min(a.micro_batch),
                             global_batch_tokens=a.global_batch_tokens, grad_dtype=a.grad_dtype,
                             reserve=a.reserve_gib * 2**30)
        would = (f"What would fit: {fewest.why}." if fewest else
                 f"Nothing would fit on up to 2^20 GPUs of {hw.name} at {a.seq} tokens per sequence.")
        return [f"Nothing fits: no split of {heading} fits and runs. {would} The closest, first:", ""] + lines, 1
    figure = a.out / "plans.png"
    save_figure(plot_plans(plans, title=heading), figure)
    best = plans[0]
    pipeline = f"pp={best.pp} " + (f"(v={best.v}) " if best.v > 1 else "") if best.pp > 1 else ""
    knobs = (f", micro-batch {best.micro_batch}" if a.micro_batch != [1] else "") + \
        (f", TP overlap {'on' if best.overlap_tp else 'off'}" if a.overlap_tp != "off" else "")
    headline = (f"Best: {pipeline}dp={best.dp} cp={best.cp} tp={best.tp} {best.attention}, recompute {best.recompute}, "
                f"ZeRO {best.zero}{knobs}: "
                f"{format_seconds(best.step_time)} per step, {best.memory.total / 2**30:.1f} GiB per GPU ({heading})")
    return [headline, ""] + lines + [str(figure)], 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tpsp_sim")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("report", help=__doc__.splitlines()[0], description=__doc__)
    cmd.add_argument("--world-size", type=POSITIVE, nargs="+", default=[2, 4, 8],
                     help="ranks to sweep; the first is used for the bars and timelines (default: 2 4 8)")
    cmd.add_argument("--seq", type=POSITIVE, nargs="+", default=[4096, 8192, 16384, 32768],
                     help="sequence lengths to sweep; the first is used elsewhere (default: 4096 ... 32768)")
    cmd.add_argument("--batch", type=POSITIVE, default=1)
    cmd.add_argument("--hidden", type=POSITIVE, default=1024)
    cmd.add_argument("--heads", type=POSITIVE, default=16)
    hardware = cmd.add_mutually_exclusive_group()
    hardware.add_argument("--hardware", default="h100-nvlink", choices=sorted(CLUSTERS),
                          help="a one-link preset or a cluster (groups spanning nodes use its inter-node link)")
    hardware.add_argument("--cluster-file", type=Path, help="a TOML file of Cluster fields (instead of --hardware)")
    cmd.add_argument("--methods", nargs="+", default=list(all_methods()), choices=all_methods())
    cmd.add_argument("--device", default="meta", choices=("meta", "cpu"),
                     help="meta: shapes only, nothing computed (fast at any size); cpu: real tensors")
    cmd.add_argument("--out", type=Path, required=True, help="directory for the PNGs and report.md")
    add_plan_command(commands)
    a = parser.parse_args(argv)
    if a.command == "plan":
        lines, status = plan_command(a, commands.choices["plan"])
        for line in lines:
            print(line)
        if status:
            sys.exit(status)
        return
    hw = _cluster_arg(commands.choices["report"], a.cluster_file, a.hardware)
    _writable_directory(commands.choices["report"], a.out)
    cfg = Config(world_size=a.world_size[0], seq=a.seq[0], batch=a.batch, hidden=a.hidden, heads=a.heads,
                 device=a.device)
    try:
        paths = report(a.out, cfg, a.world_size, a.seq, hw, a.methods)
    except NothingRuns as error:
        print(f"Nothing runs: {error}", file=sys.stderr)
        sys.exit(1)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
