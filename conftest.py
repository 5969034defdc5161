"""Set for every test run, tests/ and notebooks/ alike (pytest loads this file first)."""

import os

# One OpenMP thread per test process, and for what it starts (gloo workers, notebook kernels inherit the
# variable). Two pytest-xdist workers on two cores, each with torch's default of one thread per core,
# oversubscribe the machine and OpenMP's waiting threads spin: tests/test_pipeline.py, test_fsdp_training.py
# and test_training.py on 2 workers took 49-228 s (median 175 s, 183 s of CPU) instead of 20-41 s
# (median 21 s) with one thread (farm-bench, 3 pairs, load 5). The simulator already computes each
# virtual rank on one thread (sim/runtime.py); this covers the dense references and everything else.
# It is set, not defaulted: the notebooks' stored outputs are computed on one thread (tools/run_notebooks.py),
# and a float64 sum's last bit depends on the thread count.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402 (after the variable, so that its thread pool starts with it)

torch.set_num_threads(1)  # in case a plugin imported torch first
