"""The qwerky CLI with Triton autotuning capped to the first AUTOTUNE_CAP configs of each kernel (default 1).

A borrowed GPU comes for minutes, and fla's kernels autotune for minutes on their first call: this trades
kernel speed for compile time so that a check of training *with* the fla kernels fits a short loan.

    QWERKY_KERNELS=fla python scripts/capped_qwerky.py convert --teacher T --out S ...
    QWERKY_FSDP=1 torchrun --nproc_per_node 1 scripts/capped_qwerky.py convert ...
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    from qwerky.opspecs import limit_triton_autotune

    limit_triton_autotune(int(os.environ.get("AUTOTUNE_CAP", "1")))  # before fla is imported
    from qwerky.cli import main

    raise SystemExit(main(sys.argv[1:]))
