"""Notebook 09's exercise checkers reject the typical wrong answers, saying what is wrong."""

from __future__ import annotations

from tpsp_sim.exercises import check
from tpsp_sim.pipeline import Action


def rejected(name, fn, fragment):
    report = check(name, fn)
    assert not report.ok and fragment in str(report), str(report)


def test_gpipe_order_keeps_too_many_in_flight():
    rejected("one_f_one_b_program", lambda r, p, m: [Action("F", k) for k in range(m)] + [Action("B", k) for k in range(m)],
             "m=2: rank 1 keeps 2 micro-batches in flight (between F and B), 1F1B keeps at most min(p - rank, m) = 1")


def test_no_warm_up_waits_too_long_and_a_skipped_warm_up_deadlocks():
    rejected("one_f_one_b_program", lambda r, p, m: [a for k in range(m) for a in (Action("F", k), Action("B", k))],
             "m=2: bubble 0.5000 of the step, 1F1B's is (p-1)/(m+p-1) = 0.3333")

    def last_rank_warms_up(r, p, m):  # the ranks' warm-ups reversed: rank p-1 runs ahead, rank 0 does not
        w = min(r, m)
        return ([Action("F", k) for k in range(w)] + [a for k in range(m - w) for a in (Action("F", k + w), Action("B", k))]
                + [Action("B", k) for k in range(m - w, m)])

    rejected("one_f_one_b_program", last_rank_warms_up, "DeadlockError: pipeline program deadlocks")


def test_microbatch_count_off_by_one_either_way():
    rejected("microbatches_for_bubble", lambda p, t: round((p - 1) * (1 / t - 1)),
             "m=9 leaves a bubble of 0.1000 (measured on the dry run), not below 0.1")
    rejected("microbatches_for_bubble", lambda p, t: 100, "m=99 already brings the bubble to 0.0100 < 0.1")
