#!/usr/bin/env bash
# Install (scripts/install.sh), install the offline dataset (Debian's dataset-fashion-mnist,
# needs root or sudo), then run the end-to-end demo.  Extra arguments go to the demo,
# e.g. `bash scripts/demo.sh --quick` or `--out results/`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
VENV=${VENV:-.venv}
exec "$VENV/bin/datta-kernels" demo "$@"
