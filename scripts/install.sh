#!/usr/bin/env bash
# Create ./.venv (or $VENV), install torch + the test/demo tools, and build datta_kernels._C.
# torch: TORCH_SPEC (default torch==2.13.0, the CPU build this project is developed on;
# any torch>=2.4 works: set TORCH_SPEC to the one you use).  The extension is built with
# --no-build-isolation so it compiles against exactly that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_SPEC"
# test + demo tools; triton runs its kernels on CPU under TRITON_INTERPRET=1
"$PY" -m pip install -q numpy scipy pytest pytest-benchmark ruff ninja matplotlib tqdm "triton>=3.0"
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import datta_kernels, datta_kernels._ext as e; print('datta_kernels', datta_kernels.__version__, e.build_info())"
