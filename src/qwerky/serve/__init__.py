"""Serving: continuous-batching engine, prefix state cache and an OpenAI-compatible server.

`add_serve_arguments` / `serve_main` are the hooks for `qwerky serve`; they import FastAPI and torch
only when called so that the CLI stays quick to start.
"""

from __future__ import annotations

import argparse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `qwerky serve DIR [--host] [--port] [--max-concurrent] [--max-prompt-tokens] ...` arguments."""
    from .app import add_serve_arguments as add

    add(parser)


def serve_main(args: argparse.Namespace) -> int:
    """Run the server for parsed `qwerky serve` arguments; returns the exit code."""
    from .app import serve_main as run

    return run(args)


__all__ = ["add_serve_arguments", "serve_main"]
