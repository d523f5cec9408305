#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment from the repo's own files, CPU only.
# Usage: scripts/install.sh [VENV_DIR]   (default .venv). Re-running is cheap: a stamp skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${SPMAMBA_VENV:-.venv}}"
STAMP="$VENV/.spmamba-installed"
HASH="$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
echo "[install] creating $VENV (CPU-only torch; about 4 GB, a few minutes)" >&2
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: an unpinned torch (asked for by any later package) would pull a multi-GB CUDA build.
# TORCH_INDEX_URL (optional) points pip at a CPU-only wheel index, e.g. PyTorch's own CPU index, on machines
# where the default index would serve the CUDA build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  $PIP install -q torch==2.13.0
fi
# sam2 (a monailabel requirement) ships only a source archive; building it in isolation pulls another CUDA torch.
$PIP install -q --no-build-isolation -c constraints.txt sam2==1.1.0 torch==2.13.0
$PIP install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
$PIP install -q --no-deps -e .
# compile the selective scan's CPU kernels once (numba keeps them on disk), so a first detection does not wait for it
"$VENV/bin/python" -c "from spmamba.ops.selective_scan_numba import warm; warm()" \
  || echo "[install] warning: the compiled selective scan is not available; the slower PyTorch scan will be used" >&2
echo "$HASH" > "$STAMP"
echo "[install] done: $VENV" >&2
