"""`python -m qwerky` (and `torchrun -m qwerky`) entry point."""

from qwerky.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
