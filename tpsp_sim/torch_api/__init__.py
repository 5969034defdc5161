"""PyTorch's own distributed API on the package's ranks: a torch.distributed backend over each rank's ``Comm``.

``ts.run(fn, world_size=N, torch_distributed=True)``: inside ``fn`` every rank has an initialised default
group, so ``import torch.distributed as dist`` code, DTensor (``parallelize_module``) and FSDP2
(``fully_shard``) run unmodified, every call recorded in the run's trace. ``world.py``: c10d's state per
rank and its restoration; ``process_group.py``: the process group; ``backend.py``: the backend and its
groups on the simulator and on real processes; ``plans.py``: PyTorch's TP+SP plan of ``ts.LlamaBlock``.
"""
