"""One pipeline stage: a submodule, its place in the pipeline, and what it keeps per micro-batch between F and B (W).

``PipelineStage(submodule, stage_index, num_stages, comm)`` follows torch.distributed.pipelining's
``PipelineStage(submodule, stage_index, num_stages, device, group=...)``: ``comm`` is the pipeline's
group (``mesh["pp"]`` on a mesh). Stage s lives on rank s mod p of ``comm`` (p = its world size), so
``num_stages`` = v·p gives each rank v stages (interleaved schedules).

The submodule takes one tensor and returns one (what crosses to the next stage). Per micro-batch the
stage keeps its input (made differentiable: its gradient goes to the previous
stage) and its output, and measures with ``ts.saved_tensor_meter`` the activation bytes the forward
saved for backward. They are let go when the micro-batch's backward is complete (after B, or after W
when B computed only the input gradient).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.saved import saved_tensor_meter
from ..core.comm import Comm
from ..core.errors import SimulationError
from .backward import backward_input


class PipelineStage:
    """``submodule`` as stage ``stage_index`` of ``num_stages``, on rank ``stage_index % comm.world_size`` of ``comm``."""

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, comm: Comm) -> None:
        p = comm.world_size
        if not isinstance(num_stages, int) or num_stages < 1 or num_stages % p:
            raise ValueError(f"PipelineStage: num_stages={num_stages!r} must be a positive multiple of the pipeline's "
                             f"{p} ranks (comm.world_size)")
        if not isinstance(stage_index, int) or not 0 <= stage_index < num_stages:
            raise ValueError(f"PipelineStage: stage_index={stage_index!r} must be in [0, {num_stages})")
        if stage_index % p != comm.rank:
            raise ValueError(f"PipelineStage: stage_index={stage_index} lives on rank {stage_index % p} of the "
                             f"pipeline (stage mod {p}), not on rank {comm.rank}")
        self.submodule, self.stage_index, self.num_stages, self.comm = submodule, stage_index, num_stages, comm
        self.chunk = stage_index // p
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.saved_bytes: dict[int, int] = {}  # micro-batch -> bytes its forward saved for backward (this step)
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._weight_grads: dict[int, Callable[[], None]] = {}

    def __repr__(self) -> str:
        return f"PipelineStage({self.stage_index} of {self.num_stages}, rank {self.comm.rank} chunk {self.chunk})"

    def forward_one(self, microbatch: int, x: torch.Tensor,
                    loss_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The submodule's output for ``x``; with ``loss_of`` (the last stage) B starts from ``loss_of(output)``."""
        if x.is_floating_point():
            x = x.detach().requires_grad_()
        params = list(self.submodule.parameters())
        with saved_tensor_meter(exclude=params) as meter:
            try:
                out = self.submodule(x)
            except SimulationError:  # another rank failed, or a collective inside the stage went wrong: not ours
                raise
            except (RuntimeError, ValueError) as e:
                came_from = "the first stage's micro-batch" if self.is_first else f"stage {self.stage_index - 1}'s output"
                raise ValueError(f"PipelineStage {self.stage_index}: its submodule cannot take {came_from} "
                                 f"(shape {tuple(x.shape)}, {x.dtype}): {e}") from e
            start = out if loss_of is None else loss_of(out)
        self._inputs[microbatch], self._outputs[microbatch] = x, start
        self.saved_bytes[microbatch] = meter.nbytes
        return out

    def kept(self, microbatch: int) -> torch.Tensor:
        """What B of ``microbatch`` starts from: the output, or on the last stage the loss."""
        return self._outputs[microbatch]

    def backward_one(self, microbatch: int, grad_output: torch.Tensor | None, scale: float = 1.0,
                     split: bool = False) -> torch.Tensor | None:
        """B: backward from the output's gradient (from the loss times ``scale`` on the last stage); the
        input's gradient (None for an input that has none, e.g. token ids). ``split``: the input
        gradient only, the weights' left for ``backward_weight`` (Qi et al.'s B / W)."""
        x, out = self._inputs[microbatch], self._outputs[microbatch]
        grad = torch.full_like(out, scale) if grad_output is None else grad_output
        params = [q for q in self.submodule.parameters() if q.requires_grad]
        if split and x.requires_grad:
            (dx,), self._weight_grads[microbatch] = backward_input([out], [grad], [x], params)
        else:  # a stage whose input has no gradient (token ids) computes its weights' gradients here: its W is empty
            torch.autograd.backward([out], [grad], inputs=[x, *params] if x.requires_grad else params)
            dx = x.grad
        if microbatch not in self._weight_grads:
            self._release(microbatch)
        return dx

    def backward_weight(self, microbatch: int) -> None:
        """W: the weights' gradients of a micro-batch whose B ran split."""
        weight_grads = self._weight_grads.pop(microbatch, None)
        if weight_grads is not None:
            weight_grads()
        self._release(microbatch)

    def live_bytes(self) -> int:
        """Activation bytes saved by forwards whose backward is not complete yet."""
        return sum(self.saved_bytes[k] for k in self._inputs)

    def _release(self, microbatch: int) -> None:
        self._inputs.pop(microbatch, None)
        self._outputs.pop(microbatch, None)

    def reset(self) -> None:
        """Forget the previous step's micro-batches."""
        self.saved_bytes.clear()
        self._inputs.clear()
        self._outputs.clear()
        self._weight_grads.clear()
