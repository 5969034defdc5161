"""Backward split in two for zero-bubble schedules (Qi et al. 2023, §2): B, the input gradient, then W, the weights'.

B runs autograd from the stage's outputs to its input only, so every matmul computes dX and skips dW
(autograd computes an op's gradient for an input only when that input leads somewhere asked for).
On the way it keeps, for each weight, the gradient arriving at the node that uses it (the
"intermediate": the first node on the input's path from which the weight is reached, e.g. a
linear's ``AddmmBackward``). W later runs autograd from those saved gradients to the weights alone:
the dW matmuls, and nothing of the input path again. The graph and its saved activations stay alive
until W, which is why a zero-bubble schedule holds activations longer than 1F1B does.

torch.distributed.pipelining does the same (``stage_backward_input`` / ``stage_backward_weight``);
this is a smaller version of that idea: one autograd call per weight.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node


def grad_node(t: torch.Tensor) -> Node | None:
    """The autograd node gradients of ``t`` flow into: its ``grad_fn``, or a leaf's gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        return t.view_as(t).grad_fn.next_functions[0][0]  # a leaf's accumulator appears behind a view
    return None


def _parents(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """{node: the nodes whose gradient flows into it}: the graph below ``roots`` with its edges reversed."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    seen, todo = set(roots), list(roots)
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is not None:
                parents[child].append(node)
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
    return parents


def _upward(starts: Sequence[Node], parents: dict[Node, list[Node]], stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Nodes reached from ``starts`` against the gradient's flow, not entering ``stop``; and the ``stop`` nodes met."""
    reached, met, todo = set(starts), set(), list(starts)
    while todo:
        for parent in parents[todo.pop()]:
            if parent in stop:
                met.add(parent)
            elif parent not in reached:
                reached.add(parent)
                todo.append(parent)
    return reached, met


def backward_input(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None],
                   inputs: Sequence[torch.Tensor], weights: Sequence[torch.nn.Parameter]
                   ) -> tuple[tuple[torch.Tensor, ...], Callable[[], None]]:
    """B: the gradients of ``inputs`` (each must require grad); returns them and W, a function that adds
    each weight's gradient to its ``.grad``.

    1. Reverse the graph below ``outputs``; mark every node from which an input is reached.
    2. For each weight, walk up from its accumulator to the first marked nodes: its intermediates.
    3. Hook every intermediate to keep the gradient arriving at it, run autograd to the inputs.
    4. W: for each weight, autograd from its intermediates' kept gradients to that weight only.
    """
    roots = [o.grad_fn for o in outputs]
    parents = _parents(roots)
    on_input_path, _ = _upward([grad_node(x) for x in inputs], parents, stop=set())
    uses = {}
    for w in weights:
        acc = grad_node(w)
        if acc in parents:  # the weight took part in this forward
            uses[w] = sorted(_upward([acc], parents, stop=on_input_path)[1], key=id)
    kept: dict[Node, tuple] = {}
    hooks = [node.register_prehook(lambda grads, node=node: kept.__setitem__(node, grads))
             for node in {n for ns in uses.values() for n in ns}]
    try:
        dx = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)
    finally:
        for h in hooks:
            h.remove()

    def backward_weight() -> None:
        clamps = [node.register_prehook(lambda _, g=g: g) for node, g in kept.items()]  # no double counting
        try:
            for w, nodes in uses.items():
                edges = [(GradientEdge(n, i), g) for n in nodes for i, g in enumerate(kept[n]) if g is not None]
                (dw,) = torch.autograd.grad([e for e, _ in edges], [GradientEdge(grad_node(w), 0)],
                                            [g for _, g in edges], retain_graph=True)
                w.grad = dw if w.grad is None else w.grad + dw
        finally:
            for h in clamps:
                h.remove()
            kept.clear()
            uses.clear()

    return dx, backward_weight
