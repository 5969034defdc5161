"""ts.memory.budget with pipeline parallelism: layers per stage, the embedding on the first stage and the output
layer on the last, the micro-batches each schedule keeps in flight, held against Megatron-LM's
``theoretical_memory_usage.py`` (NVIDIA/Megatron-LM, megatron/training/theoretical_memory_usage.py) with pp > 1."""

import pytest
from hypothesis import given, settings, strategies as st

import tpsp_sim as ts
from tpsp_sim.analysis.memory import peak_in_flight, stage_layers
from tpsp_sim.analysis.models import MODELS, Model
from tpsp_sim.pipeline import SCHEDULES, in_flight

GPT = Model("gpt", 16, 1024, 16, 16, 4096, 1000, mlp="gelu")  # q = h, f = 4h: Table 2's GPT layer


def megatron_activations(s, b, h, f, layers, pp, t, m=None, v=None):
    """Megatron's compute_activation_memory (sequence parallel, selective recompute), first stage, transcribed:
    per layer sbh(18 + 4f/h), times all layers; the embedding's input 8sb and dropout mask sbh, pp micro-batches
    in flight; times the interleaved penalty 1 + (pp−1)/(pp·v), or min(1, m/pp); the output layer only at pp = 1."""
    total = s * b * h * (18 + 4 * f / h) * layers + 8 * s * b * pp + s * b * h * pp
    if v is not None:
        total *= 1 + (pp - 1) / (pp * v)
    elif pp > 1 and m is not None:
        total *= min(1, m / pp)
    return total / t


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 8), (4, 2), (8, 16)])
def test_first_stage_activations_equal_megatrons_formula_for_a_gpt_layer(pp, m):
    """GPT-shaped (no Llama differences): the first stage keeps in_flight(1f1b) = min(pp, m) micro-batches of its
    L/pp layers and the embedding's ids and dropout mask, exactly Megatron's count."""
    s, t = 2048, 4
    b = ts.memory.budget(GPT, (1, 1, t), s, 1, recompute="selective", pp=pp, n_microbatches=m)
    assert b.stage == 0 and b.layers == 16 // pp and b.in_flight == min(pp, m)
    assert b.activations == pytest.approx(megatron_activations(s, 1, 1024, 4096, 16, pp, t, m), rel=1e-12)


def test_interleaved_first_stage_against_megatrons_penalty():
    """Interleaved 1F1B, pp = 4, v = 2, m = 8: the layers' activations are Megatron's L·A·(1 + 3/8) exactly;
    the embedding is on stage 0 only, the rank's chunk 0, and at the peak (F0.0 ... F7.0 done, B0.1 done, 11
    chunk-micro-batches kept) all 8 micro-batches of chunk 0 are in flight, where Megatron charges it
    pp · 11/8 = 5.5 times."""
    s, t, pp, v, m = 2048, 4, 4, 2, 8
    layer = 34 * s * 1024 / t
    embedding = (8 * s + s * 1024) / t
    b = ts.memory.budget(GPT, (1, 1, t), s, 1, recompute="selective", pp=pp, virtual_stages=v,
                         schedule="interleaved_1f1b", n_microbatches=m)
    assert in_flight("interleaved_1f1b", pp, m, v) == pp * (1 + (pp - 1) / (pp * v)) == 5.5
    assert b.stage == 0 and b.activations == 5.5 * 4 * layer + 8 * embedding
    megatron = megatron_activations(s, 1, 1024, 4096, 16, pp, t, v=v)
    assert megatron == 5.5 * 4 * layer + 5.5 * embedding
    assert b.activations - megatron == 2.5 * embedding


def test_llama3_70b_first_stage_against_megatron_pinned():
    """Llama 3 70B, tp = 8, pp = 4, dp = 8, 8K tokens, m = 16, selective recompute, distributed optimizer.

    Megatron: weights and optimizer ((80·P + h)/4 + V·h)/8 · (6 + 12/8) with P = 855,654,400 per layer (all of
    it divided by t, the final norm by pp); here 20 layers of P₈ = 106,971,136 (the two RMSNorms, 2h, replicated
    on each tp rank) and V·h/8: 20 · 2h · 7/8 − h/32 parameters more. Activations: Megatron charges GPT's
    (18h + 4f)·sb/t per layer and an embedding dropout mask Llama has not; here Llama's 12h + 4h·8/64 + 8f."""
    h, f, V, s = 8192, 28672, 128256, 8192
    b = ts.memory.budget("llama3-70b", (8, 1, 8), s, 1, recompute="selective", pp=4, n_microbatches=16)
    assert (b.stage, b.layers, b.in_flight) == (0, 20, 4)
    megatron_params = (80 * 855_654_400 + h) / 4 / 8 + V * h / 8
    assert b.parameters == 20 * 106_971_136 + V * h / 8 == 2_270_756_864
    assert b.parameters - megatron_params == pytest.approx(20 * 2 * h * 7 / 8 - h / 32, rel=1e-12)
    assert b.states == pytest.approx((6 + 12 / 8) * b.parameters, rel=1e-12)
    assert round(b.states / 2**30, 3) == 15.861 and round((6 + 12 / 8) * megatron_params / 2**30, 3) == 15.859
    megatron = megatron_activations(s, 1, h, f, 80, 4, 8, 16)
    llama_layer = s * (12 * h + 4 * h * 8 / 64 + 8 * f) / 8
    assert b.activations == 4 * (20 * llama_layer + 8 * s / 8)
    assert (round(b.activations / 2**30, 2), round(megatron / 2**30, 2)) == (25.31, 20.03)  # Llama's layer: +28%


def test_the_last_stage_can_be_the_worst():
    """1F1B's last stage keeps one micro-batch, but of the output layer's fp32 logits (4·s·b·V/t): with a large
    vocabulary it needs more than the first; GPipe keeps all m micro-batches on every stage."""
    big_vocab = Model("big vocab", 8, 256, 4, 4, 1024, 200_000, mlp="gelu")
    b = ts.memory.budget(big_vocab, (1, 1, 1), 1024, 1, recompute="selective", pp=4, n_microbatches=8)
    layer, logits = 34 * 1024 * 256, 4 * 1024 * 256 * (1 + 200_000 / 256)
    assert (b.stage, b.layers, b.in_flight) == (3, 2, 1.0)
    assert b.activations == 2 * layer + logits and b.output_activations == logits  # the last rank's: no embedding
    gpipe = ts.memory.budget(big_vocab, (1, 1, 1), 1024, 1, recompute="selective", pp=4, n_microbatches=8,
                             schedule="gpipe")
    assert gpipe.stage == 3 and gpipe.activations == 8 * (2 * layer + logits)
    first = ts.memory.budget(GPT, (1, 1, 1), 1024, 1, recompute="selective", pp=4, n_microbatches=8)
    assert first.stage == 0 and first.output_activations == 8 * 1024 + 1024 * 1024  # token ids, dropout mask


@pytest.mark.parametrize("schedule, p, m, v", [("1f1b", 4, 8, 1), ("gpipe", 3, 5, 1), ("zbh1", 4, 6, 1),
                                               ("interleaved_1f1b", 2, 4, 2), ("interleaved_1f1b", 4, 8, 3)])
def test_the_program_walk_of_stage_0_is_the_closed_form(schedule, p, m, v):
    """peak_in_flight walks a rank's program; on stage 0 with equal chunks it is in_flight × the stage's bytes."""
    assert peak_in_flight(schedule, p, m, v, 0, [1.0] * v) == pytest.approx(v * in_flight(schedule, p, m, v), rel=1e-12)


def test_parameters_per_stage_and_the_split():
    """Llama 3 8B on pp = 4: 8 layers per rank; the first holds the embedding, the last the output layer and the
    final norm; the stages add up to the whole model. Llama 3 405B's 126 layers in 16 stages: 7, 8 x 14, 7."""
    m = MODELS["llama3-8b"]
    first = ts.memory.budget(m, (1, 1, 1), 4096, 1, pp=4, n_microbatches=8)
    assert first.stage == 0 and first.parameters == 8 * m.layer_parameters() + m.vocab * m.d_model
    assert 4 * (first.parameters - m.vocab * m.d_model) + 2 * m.vocab * m.d_model + m.d_model == m.parameters()
    big_vocab = Model("big vocab", 8, 256, 4, 4, 1024, 200_000, mlp="gelu")
    last = ts.memory.budget(big_vocab, (1, 1, 2), 1024, 1, pp=4, n_microbatches=8)
    assert last.stage == 3 and last.parameters == 2 * big_vocab.layer_parameters(2) + 200_000 * 256 / 2 + 2 * 256
    assert stage_layers(126, 16, "ends") == [7] + [8] * 14 + [7]
    with pytest.raises(ValueError, match="n_layers=126 does not split into 16 pipeline stages"):
        ts.memory.budget("llama3-405b", (1, 1, 8), 8192, 1, pp=16)
    with pytest.raises(ValueError, match="n_layers=126 \\+ 2 does not split into 12 stages"):
        stage_layers(126, 12, "ends")
    b = ts.memory.budget("llama3-405b", (128, 1, 8), 8192, 1, recompute="selective", pp=16, n_microbatches=16,
                         layers_per_stage=stage_layers(126, 16, "ends"))
    assert b.layers in (7, 8)
    for bad, match in (({"pp": 0}, "pp must be a positive int"), ({"schedule": "dualpipe", "pp": 2}, "schedule must be"),
                       ({"pp": 2, "schedule": "gpipe"}, "pass n_microbatches"),
                       ({"pp": 2, "virtual_stages": 2, "schedule": "1f1b", "n_microbatches": 4}, "v = 1 unless interleaved"),
                       ({"pp": 2, "layers_per_stage": [20, 10]}, "adding up to n_layers=32")):
        with pytest.raises(ValueError, match=match):
            ts.memory.budget("llama3-8b", (1, 1, 1), 4096, 1, **bad)


def test_no_pipeline_is_the_budget_as_before():
    """pp = 1 is the budget without pipeline: every layer, the embedding and output layer, one micro-batch."""
    before = ts.memory.budget("llama3-8b", (8, 2, 1), 16384, 1, recompute="selective")
    assert before == ts.memory.budget("llama3-8b", (8, 2, 1), 16384, 1, recompute="selective", pp=1,
                                      schedule="gpipe", n_microbatches=64)
    assert (before.stage, before.layers, before.in_flight) == (0, 32, 1.0)


@settings(max_examples=20, deadline=None)
@given(schedule=st.sampled_from(["gpipe", "1f1b", "zbh1", "interleaved_1f1b"]), p=st.integers(1, 5),
       rounds=st.integers(1, 3), v=st.integers(2, 3), data=st.data())
def test_the_peak_is_the_plain_walk_of_the_program(schedule, p, rounds, v, data):
    """peak_in_flight keeps only undominated per-chunk counts; a plain walk over every action, with any bytes per
    chunk, peaks at the same bytes on every rank."""
    v = v if schedule == "interleaved_1f1b" else 1
    m = p * rounds
    chunk_bytes = data.draw(st.lists(st.integers(0, 1000), min_size=v, max_size=v))
    program = SCHEDULES[schedule].make_program(p, m, v)
    for rank, actions in program.items():
        split = {(a.microbatch, a.chunk) for a in actions if a.kind == "W"}
        kept = peak = 0
        for a in actions:
            if a.kind == "F":
                kept += chunk_bytes[a.chunk]
                peak = max(peak, kept)
            elif a.kind == ("W" if (a.microbatch, a.chunk) in split else "B"):
                kept -= chunk_bytes[a.chunk]
        assert peak_in_flight(schedule, p, m, v, rank, chunk_bytes) == peak
