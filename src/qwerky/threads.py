"""How many CPU threads a job should use: torch's default is one per core, which a busy machine punishes.

At the bottom of the package (it needs only torch) so that training, evaluation and planning all ask it the same
question the same way.
"""

from __future__ import annotations

import os

import torch


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's CPU thread count for this run; returns it and why it was chosen (logged at run start).

    `requested` > 0 (train.threads) is used as given; OMP_NUM_THREADS in the environment is left to torch.
    Otherwise: one thread per core the machine has free, judged by the 1-minute load average before the run
    starts, and at least one. On a busy machine fewer threads are faster, not just fairer: every parallel
    op ends in a barrier, and when another process holds one of the cores the op waits for a whole
    scheduler slice. Measured on a shared 2-core CPU (load ~6): the chunked RWKV-7 forward+backward took
    0.18-0.29 s with 1 thread and 1.1-14 s with 2; a big matmul gained nothing from the second thread."""
    if requested > 0:
        torch.set_num_threads(requested)
        return torch.get_num_threads(), f"train.threads={requested} in the recipe"
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        return torch.get_num_threads(), f"OMP_NUM_THREADS={env} in the environment"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return default, f"torch's default ({default}, one per core); the load average is unknown here"
    free = max(1, min(default, int(cores - load + 0.5)))
    if free < default:
        torch.set_num_threads(free)
        return free, (f"{free} of {cores} cores: the machine is busy (load average {load:.1f} before the run); "
                      "threads waiting on a core another process holds stall every op (set train.threads to "
                      "override)")
    return default, f"torch's default, one per core ({default}); the machine is idle (load average {load:.1f})"
