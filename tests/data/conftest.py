"""Make ``qwerky`` importable from a source checkout when the package is not pip-installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("qwerky") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
