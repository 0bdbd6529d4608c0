#!/usr/bin/env bash
# Every multi-process step of the tests and of .ci/run, N times in a row (default 20), while two
# busy loops load the machine; stops at the first failure and prints how many runs passed.
#
#   bash scripts/stress_multiprocess.sh [N]          # VENV=.venv (default) must be installed
#
# The steps (the commands .ci/run uses): the torchrun example (2 gloo processes == 1 process),
# bench/bench_distributed.py on a tiny shape (1 and 2 processes, synced and local), and
# tests/test_distributed.py (spawns 2 and 3 processes per scenario).  The busy loops are two
# `yes > /dev/null` processes started here and killed on any exit (trap).  Every step runs
# under `timeout` (its whole process group: nothing is left running).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
VENV=${VENV:-.venv}
PY="$PWD/$VENV/bin/python"
LOGS=$(mktemp -d)
busy=()
cleanup() {
  for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in 1 2; do yes > /dev/null & busy+=($!); done

steps=(torchrun_example bench_distributed test_distributed)
step_cmd() {
  case $1 in
    torchrun_example)
      timeout -k 20 300 "$PWD/$VENV/bin/torchrun" --standalone --nproc-per-node 2 \
        python/adapt_distributed.py --synthetic --per-domain 16 --batch-size 16 --threshold 1e9 --compare ;;
    bench_distributed)
      timeout -k 20 300 "$PY" bench/bench_distributed.py --shape 2,3,32,32 --reps 1 --out "$LOGS/dist.md" ;;
    test_distributed)
      timeout -k 20 1200 "$PY" -m pytest tests/test_distributed.py -q -p no:cacheprovider ;;
  esac
}

echo "stress_multiprocess: $N runs of [${steps[*]}] with 2 busy loops (pids ${busy[*]})"
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)'); $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')); $("$PY" -c 'import torch; print("torch", torch.__version__)')"
declare -A total
for s in "${steps[@]}"; do total[$s]=0; done
start=$SECONDS
for ((i = 1; i <= N; i++)); do
  for s in "${steps[@]}"; do
    t0=$SECONDS
    rc=0
    step_cmd "$s" > "$LOGS/$s.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
      echo "run $i/$N: $s FAILED (exit status $rc, $((SECONDS - t0)) s, load $(cut -d' ' -f1 /proc/loadavg)); last lines:"
      tail -n 40 "$LOGS/$s.log"
      echo "RESULT: $((i - 1))/$N runs passed before the first failure (run $i, step $s)"
      exit 1
    fi
    total[$s]=$((total[$s] + SECONDS - t0))
    printf 'run %d/%d: %-18s ok %4d s (load %s)\n' "$i" "$N" "$s" "$((SECONDS - t0))" "$(cut -d' ' -f1 /proc/loadavg)"
  done
done
for s in "${steps[@]}"; do echo "mean time of $s: $((total[$s] / N)) s"; done
echo "RESULT: $N/$N runs passed ($((SECONDS - start)) s in all)"
