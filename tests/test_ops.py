"""The table of collectives: the README's bytes table and ops.py's docstring say the same, and the code does it."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tpsp_sim.core import ops
from tpsp_sim.core.comm import Comm

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| op | input per rank | sent per rank | received per rank | latency steps |"
EXCEPTION = re.compile(r"^(.*?)(?: \(0 on the (root|last rank)\))?$")


def table(text: str) -> dict[str, tuple[str, ...]]:
    """{op: (input, sent, received, latency steps)} of the one table under HEADER in ``text``."""
    assert text.count(HEADER) == 1
    lines = text.split(HEADER, 1)[1].strip().splitlines()[1:]  # skip the |---| line
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        op, *cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[op] = tuple(cells)
    return rows


def evaluate(formula: str, p: int, n: int) -> Fraction:
    """A cell such as "2(p−1)/p·N" as an exact number (n and N both stand for the input's bytes)."""
    python = formula.replace("−", "-").replace("·", "*")
    python = re.sub(r"(\d)\(", r"\1*(", python)
    assert re.fullmatch(r"[-+*/() pnN0-9]+", python), formula
    return eval(python, {}, {"p": Fraction(p), "n": Fraction(n), "N": Fraction(n)})  # noqa: S307 - checked above


def expected_bytes(cell: str, p: int, n: int, position: int) -> int:
    """Whole bytes a cell gives the rank ``position`` steps after the root (fractions rounded down)."""
    formula, zero_on = EXCEPTION.match(cell).groups()
    if (zero_on == "root" and position == 0) or (zero_on == "last rank" and position == p - 1):
        return 0
    return math.floor(evaluate(formula, p, n))


def test_the_readme_table_is_ops_docstring_table():
    assert table(README.read_text()) == table(ops.__doc__)


def test_every_recorded_op_is_in_the_table_and_every_op_is_callable():
    rows = table(ops.__doc__)
    assert set(rows) == set(ops.recorded_ops()) == set(ops.OPS) - {"new_group"}  # new_group is not recorded
    for name, op in ops.OPS.items():
        if op.outputs is None:  # point to point and new_group: methods of their own
            assert op.torch_call is None and callable(getattr(Comm, name)), name
        else:  # a collective: Comm.collective runs it on every backend, a named method is optional
            assert callable(op.torch_call), name


@pytest.mark.parametrize("op", sorted(set(ops.OPS) - {"new_group"}))
@pytest.mark.parametrize("n", [840, 1001])  # 1001: fractions of a byte are rounded down
def test_wire_bytes_and_latency_steps_are_the_tables(op, n):
    _, sent, received, steps = table(ops.__doc__)[op]
    for p in range(2, 7):
        assert ops.latency_steps(op, p) == evaluate(steps, p, n), p
        for index in range(p):
            for root in range(p):
                position = (index - root) % p
                want = (expected_bytes(sent, p, n, position), expected_bytes(received, p, n, position))
                assert ops.wire_bytes(op, n, p, index, root) == want, (p, index, root)


def test_the_formulas_on_hand_computed_cases():
    """Independent of the parser above: 4 ranks, 1000 bytes of input."""
    assert ops.wire_bytes("all_gather", 1000, 4) == (3000, 3000)
    assert ops.wire_bytes("reduce_scatter", 1000, 4) == (750, 750)
    assert ops.wire_bytes("all_reduce", 1000, 4) == (1500, 1500)
    assert ops.wire_bytes("all_to_all", 1000, 4) == (750, 750)
    assert [ops.wire_bytes("broadcast", 1000, 4, i, root=1) for i in range(4)] == [(0, 1000), (1000, 0),
                                                                                   (1000, 1000), (1000, 1000)]
    assert ops.wire_bytes("send", 1000, 4) == (1000, 0) and ops.wire_bytes("recv", 1000, 4) == (0, 1000)
    assert ops.wire_bytes("all_reduce", 10, 3) == (13, 13)  # 2·2/3·10 = 13.3 bytes
    assert [ops.latency_steps(op, 4) for op in ("all_gather", "all_reduce", "all_to_all", "barrier")] == [3, 6, 1, 6]


def test_one_rank_moves_nothing_and_pays_no_latency():
    for op in set(ops.OPS) - {"send", "recv"}:
        assert ops.wire_bytes(op, 1000, 1) == (0, 0) and ops.latency_steps(op, 1) == 0


def test_unknown_ops_are_named():
    with pytest.raises(ValueError, match="unknown communication op 'gather'; ops are"):
        ops.wire_bytes("gather", 8, 2)


def test_describe_call_names_the_arguments_from_the_table():
    x = torch.zeros(2, 3)
    assert ops.describe_call("reduce_scatter", x, (1, "avg")) == \
        "reduce_scatter(shape=(2, 3), dtype=torch.float32, dim=1, op='avg')"
    assert ops.describe_call("new_group", None, ((0, 2),)) == "new_group(ranks=(0, 2))"
    assert ops.describe_call("barrier", None, ()) == "barrier()"


def test_every_op_has_a_colour_and_reduce_ops_name_torch_members():
    assert len({op.color for op in ops.OPS.values()}) == len(ops.OPS)
    assert set(ops.REDUCE_OPS) == {"sum", "avg", "max", "min", "prod"}
    assert all(hasattr(torch.distributed.ReduceOp, member) for member in ops.REDUCE_OPS.values())
