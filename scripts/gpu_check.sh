#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared run of at most 8 minutes on one H200, build
# included, for a machine with an NVIDIA GPU, a CUDA build of torch >= 2.4, Triton, ninja and
# a CUDA toolkit (nothing is downloaded):
#
#   OUT=gpu-results bash scripts/gpu_check.sh          # every step, in the order below
#   bash scripts/gpu_check.sh --plan                   # the steps and their budgets, no run
#   OUT=gpu-results bash scripts/gpu_check.sh rows repro   # some steps only
#
# Steps run in order of value, each under its own `timeout` (its budget, seconds; the budgets
# sum to at most 480; they are the times one H200 run took, 2026-12-04, plus a margin:
# bench/results/gpu_check.md).  Each writes $OUT/<step>.log; $OUT/summary.md has one line per step:
# passed / failed / timed out, and its seconds.  Exit status 1 when any step did not pass.
# A step's Python cases report PASS / FAIL / SKIP each (scripts/gpu_check.py); a crash is a
# FAIL, never a skip.  The correctness steps run Triton with one launch config per kernel
# (DATTA_TRITON_AUTOTUNE=0: one compile per shape, not one per config); `bench` autotunes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
export PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # H200 / H100 only: half the nvcc time
export MAX_JOBS=${MAX_JOBS:-$(nproc)}                        # ninja jobs of the build
export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package imports from here, installed or not
MAX_TOTAL_S=480

# name  budget_s  what
PLAN="
env             10  nvidia-smi; torch, CUDA, Triton, setuptools versions; compute-sanitizer present
build           58  pip install -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, ninja, MAX_JOBS=$MAX_JOBS); cuda=1, every kernel op on CUDA
rows            80  gpu_check.py rows: cuda and triton vs the reference (edge rules, fp16/bf16, channels_last, (1,C,1,1), (256,2048,7,7), (1,3,1024,1024), misaligned view)
edge-tests      52  pytest tests/test_edge_rules.py tests/test_triton_launch.py (their CUDA rows)
repro           30  gpu_check.py repro: issue 21's defects 1-6 on the device
opcheck         25  gpu_check.py opcheck: torch.library.opcheck on CUDA tensors
syncdebug       40  gpu_check.py syncdebug: no host sync after warm-up, cuda and triton; the sanitizer workload once, plain (compiles its Triton kernels)
adapters        30  gpu_check.py adapters: cluster_labels, DYN and DATTA (DAFT off / on) on the device vs CPU reference; no host sync in DYN and DATTA without DAFT
sweep-cuda      35  gpu_sweep.py --backend cuda (large and odd shapes, a try per case)
sweep-triton    40  gpu_sweep.py --backend triton --small --dtypes float32 (a try per case; each new shape is a Triton compile)
memcheck-cuda    8  compute-sanitizer memcheck on the cuda kernels (split + merge shape, both layouts)
racecheck-cuda   8  compute-sanitizer racecheck, likewise
memcheck-triton 12  compute-sanitizer memcheck on the triton kernels, likewise
racecheck-triton 12 compute-sanitizer racecheck, likewise
bench           40  bench_gpu.py --quick: 64x256x56x56 fp32/bf16, GB/s and % of HBM peak, each forward pass alone too
"

plan_lines() { echo "$PLAN" | sed '/^$/d'; }

if [ "${1:-}" = "--plan" ]; then
  total=0
  while read -r name budget what; do
    printf '%-17s %4s s  %s\n' "$name" "$budget" "$what"
    total=$((total + budget))
  done < <(plan_lines)
  echo "total budget: $total s (limit $MAX_TOTAL_S s)"
  [ "$total" -le "$MAX_TOTAL_S" ] || { echo "budgets exceed $MAX_TOTAL_S s"; exit 1; }
  exit 0
fi

mkdir -p "$OUT"
SANITIZE="compute-sanitizer --error-exitcode 9 --print-limit 20"

# One function per step (run through `timeout`, so exported).
step_env() {
  nvidia-smi && "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())" \
    && "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" && command -v compute-sanitizer && command -v ninja
}
step_build() {
  # fallback (an older setuptools refusing pyproject.toml, say): the extension alone, in place;
  # the steps find the package through PYTHONPATH (set above) either way
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . || {
    echo "pip install failed; fallback: setup.py build_ext --inplace in a copy without pyproject.toml"
    rm -rf /tmp/datta-build && mkdir -p /tmp/datta-build && cp -r setup.py csrc datta_kernels /tmp/datta-build/ &&
      (cd /tmp/datta-build && "$PY" setup.py build_ext --inplace) &&
      cp /tmp/datta-build/datta_kernels/_C*.so datta_kernels/
  } || return 1
  "$PY" - <<'EOF'
import re, torch
import datta_kernels as dk, datta_kernels._ext as e
info = e.build_info()
print(dk.__file__, info)
assert str(info.get("cuda")) == "1", info
ops = re.findall(r'm\.def\(\s*"(\w+)\(', open("csrc/ops.cpp").read())
missing = [o for o in ops if o not in ("_build_info", "_dispersion_score", "_probe_spread", "_source_shift")
           and not e.has_kernel(o, "CUDA")]
assert not missing, f"no CUDA kernel: {missing}"
print("backends on cuda:", dk.available_backends("cuda"))
EOF
  "$PY" -m datta_kernels.cli info
}
step_rows() { DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py rows; }
step_edge_tests() {
  DATTA_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/test_edge_rules.py tests/test_triton_launch.py -q -p no:cacheprovider -rs
}
step_repro() { DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py repro; }
step_opcheck() { DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py opcheck; }
step_adapters() { DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py adapters; }
step_syncdebug() {
  DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py syncdebug &&
    DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_check.py sanitize --backend triton
}
step_sweep_cuda() { "$PY" scripts/gpu_sweep.py --backend cuda; }
step_sweep_triton() { DATTA_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_sweep.py --backend triton --small --dtypes float32; }
# no caching allocator under the sanitizer: an access past a tensor's end then leaves its block
sanitize() {  # sanitize TOOL BACKEND FILTER...
  local tool=$1 backend=$2; shift 2
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 DATTA_TRITON_AUTOTUNE=0 $SANITIZE --tool "$tool" "$@" \
    "$PY" scripts/gpu_check.py sanitize --backend "$backend"
}
# our CUDA kernels live in namespace datta::cuda (the substring filter sees it in every name);
# the Triton kernels are named after their Python functions (_*_kernel), which torch's own
# kernels share too closely for a substring: Triton runs unfiltered on its small workload
step_memcheck_cuda() { sanitize memcheck cuda --kernel-name kns=datta; }
step_racecheck_cuda() { sanitize racecheck cuda --kernel-name kns=datta; }
step_memcheck_triton() { sanitize memcheck triton; }
step_racecheck_triton() { sanitize racecheck triton; }
step_bench() { "$PY" bench/bench_gpu.py --quick --reps 10 --out "$OUT/gpu_dabn_quick"; }
export SANITIZE
export -f step_env step_build step_rows step_edge_tests step_repro step_opcheck step_syncdebug step_adapters \
  step_sweep_cuda step_sweep_triton sanitize step_memcheck_cuda step_racecheck_cuda \
  step_memcheck_triton step_racecheck_triton step_bench

wanted=("$@")
summary="$OUT/summary.md"
{
  echo "# scripts/gpu_check.sh on $(hostname) at $(date -u +%FT%TZ)"
  echo
  echo "| step | result | seconds | budget s |"
  echo "|---|---|---|---|"
} >"$summary"
failed=0
start=$SECONDS
while read -r name budget what; do
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
  echo "=== [$((SECONDS - start)) s] $name (budget $budget s): $what"
  t0=$SECONDS
  timeout -k 5 "$budget" bash -c "step_${name//-/_}" >"$OUT/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  case $rc in
    0) result="passed" ;;
    124|137) result="timed out"; failed=1 ;;
    *) result="failed (exit $rc)"; failed=1 ;;
  esac
  echo "| $name | $result | $secs | $budget |" >>"$summary"
  echo "    $result ($secs s)"
  if [ "$rc" -ne 0 ]; then tail -n 15 "$OUT/$name.log" | sed 's/^/    /'; fi
done < <(plan_lines)
echo >>"$summary"
echo "total: $((SECONDS - start)) s; raw logs: <step>.log next to this file" >>"$summary"
cat "$summary"
exit "$failed"
