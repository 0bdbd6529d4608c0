#!/usr/bin/env bash
# Create ./.venv (or $VENV), install torch + the test/demo tools, and build datta_kernels._C.
# torch: TORCH_SPEC (default torch==2.13.0, the CPU build this project is developed on;
# any torch>=2.4 works: set TORCH_SPEC to the one you use); torchvision: TV_SPEC (default: the
# release made for that torch).  The extension is built with
# --no-build-isolation so it compiles against exactly that torch.
# Skips everything (in well under a second) when nothing the build depends on changed since the
# last install: the stamp $VENV/.datta-install-stamp holds a hash of setup.py, pyproject.toml,
# this script, every file under csrc/, the torch and Python versions and the build's
# environment variables.  DATTA_REINSTALL=1 forces a full install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.datta-install-stamp"

build_key() {  # everything a rebuild or reinstall depends on, hashed
  {
    cat setup.py pyproject.toml scripts/install.sh
    find csrc -type f | LC_ALL=C sort | while read -r f; do echo "$f"; cat "$f"; done
    echo "TORCH_SPEC=$TORCH_SPEC TV_SPEC=${TV_SPEC:-} DATTA_NO_CUDA=${DATTA_NO_CUDA:-} CUDA_HOME=${CUDA_HOME:-}"
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
    "$VENV/bin/python" -c "import sys; print(sys.version)" 2>/dev/null || true
    cat "$VENV"/lib/python*/site-packages/torch/version.py 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

if [ "${DATTA_REINSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(build_key)" ] \
   && compgen -G "datta_kernels/_C*.so" >/dev/null; then
  echo "datta_kernels: $VENV is up to date (nothing changed since the last install; DATTA_REINSTALL=1 forces one)"
  exit 0
fi
rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_SPEC"
# test + demo tools; triton runs its kernels on CPU under TRITON_INTERPRET=1
"$PY" -m pip install -q numpy scipy pytest pytest-benchmark ruff ninja matplotlib tqdm "triton>=3.0"
# torchvision (the `run --model torchvision:<name>` models; tests/test_benchmarks.py builds its
# ResNet-50): the release made for this torch (torch 2.m -> torchvision 0.(m+15)), with --no-deps
# so pip never replaces torch (its only other needs, numpy and pillow, come with the line above)
tv=${TV_SPEC:-$("$PY" -c "import torch; a, b = map(int, torch.__version__.split('.')[:2]); print(f'torchvision==0.{b + 15}.*' if a == 2 else '')")}
[ -n "$tv" ] || { echo "install.sh: set TV_SPEC to the torchvision release made for your torch"; exit 1; }
"$PY" -m pip install -q --no-deps "$tv"
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import datta_kernels, datta_kernels._ext as e; print('datta_kernels', datta_kernels.__version__, e.build_info())"
build_key > "$STAMP"
