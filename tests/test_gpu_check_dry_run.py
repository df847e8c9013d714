"""benchmarks/gpu_check.py runs only on rare GPU loans: keep its logic from rotting between them.

`--fake-fla` puts the PyTorch forms behind the fla entry points, so every fla branch of the script and of
the dispatch runs on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _statuses(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["status"]] if isinstance(node.get("status"), str) else []
        return found + [s for v in node.values() for s in _statuses(v)]
    if isinstance(node, list):
        return [s for v in node for s in _statuses(v)]
    return []


def test_gpu_check_dry_run_has_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--fake-fla",
                           "--sections", "env", "kernels", "model", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["finished"] is True
    statuses = _statuses(data["sections"])
    assert "error" not in statuses, json.dumps(data["sections"], indent=1)[:4000]
    assert statuses.count("ok") >= 10
