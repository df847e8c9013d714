"""`python -m qwerky.eval.lm_eval_launcher <lm_eval CLI args>`: lm-eval's CLI with the "qwerky" model type.

lm-eval has no plugin option, so the adapter module must be imported before its CLI parses
`--model qwerky`; everything else is lm-eval's own command line.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    import qwerky.eval.lm_eval_adapter  # noqa: F401  (registers model type "qwerky")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    result = cli_evaluate()
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
