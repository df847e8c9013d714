"""Helpers for the serving tests: the root conftest's tiny models (loaded by path, since every test
folder's conftest.py is also named `conftest`) and a live uvicorn server on a loopback port."""

from __future__ import annotations

import argparse
import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

_ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("qwerky_serve_tests_root", _ROOT_CONFTEST)
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
tiny_teacher = _root.tiny_teacher
build_tokenizer = _root.build_tokenizer


class LiveServer:
    """uvicorn in a background thread on an ephemeral 127.0.0.1 port; stop it with the context manager."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self) -> Any:
        return self.app.state.qwerky.engine


def start_server(model_dir: Path, *extra: str) -> LiveServer:
    """Build the app exactly as `qwerky serve DIR ...` would and wrap it in a LiveServer."""
    from qwerky.serve.app import add_serve_arguments, build_app_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([str(model_dir), "--served-model-name", "tiny", *extra])
    return LiveServer(build_app_from_args(args))
