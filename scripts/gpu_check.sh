#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a machine with an NVIDIA GPU, a CUDA build
# of torch >= 2.4, Triton and a CUDA toolkit (nothing is downloaded):
#
#   OUT=gpu-results bash scripts/gpu_check.sh [steps...]      # default: all steps below
#
# steps: info build tests sweep sanitize bench
#   build     pip install --no-build-isolation . against this machine's torch (CUDA kernels on)
#   tests     the whole test suite on the GPU (CUDA and Triton rows run; no interpreter)
#   sweep     scripts/gpu_sweep.py: cuda and triton vs the reference on large and odd shapes
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck over the CUDA kernels
#   bench     bench/bench_gpu.py, bench/bench_adapt.py and bench/bench_score_layer.py tables
# Logs and result tables go to $OUT (default gpu-results/); copy the tables into bench/results/
# and commit them with the device named.  Exit status: 1 if any step failed.
# Under a per-command time limit run the steps in separate calls on the same (warm) machine,
# e.g. `info build tests`, then `sweep sanitize`, then `bench`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info build tests sweep sanitize bench)
failed=()

run() {  # run NAME CMD...: log to $OUT/NAME.log, report, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "    ok ($((SECONDS - t0)) s)"
  else
    echo "    FAILED (exit $?, $((SECONDS - t0)) s); tail of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
    failed+=("$name")
  fi
}

for step in "${steps[@]}"; do
  case $step in
    info)
      run nvidia-smi nvidia-smi
      run versions "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" ;;
    build)
      # the install users do (checked from outside the tree), then an in-place build: tests
      # and scripts run from the repository root import the source tree, which needs its _C
      run build "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .
      run build-check bash -c "cd / && $PY -c \"import datta_kernels as dk, datta_kernels._ext as e; \
info = e.build_info(); print(dk.__file__, info); assert str(info.get('cuda')) == '1', info; \
print(dk.available_backends('cuda'))\""
      run build-inplace "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
      run info-cli "$PY" -m datta_kernels.cli info ;;
    tests)
      run tests env -u TRITON_INTERPRET "$PY" -m pytest tests -q -p no:cacheprovider -rs ;;
    sweep)
      run sweep-cuda "$PY" scripts/gpu_sweep.py --backend cuda
      run sweep-triton env -u TRITON_INTERPRET "$PY" scripts/gpu_sweep.py --backend triton ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        run "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$PY" scripts/gpu_sweep.py --backend cuda --small
      done ;;
    bench)
      run bench-dabn "$PY" bench/bench_gpu.py --table --out "$OUT/gpu_dabn"
      run bench-adapt "$PY" bench/bench_adapt.py --table --device cuda --out "$OUT/cuda_adapt"
      run bench-score "$PY" bench/bench_score_layer.py --table --device cuda --out "$OUT/cuda_score_layer" ;;
    *) echo "unknown step: $step"; failed+=("$step") ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]} (logs in $OUT/)"
  exit 1
fi
echo "all steps passed (logs and tables in $OUT/)"
