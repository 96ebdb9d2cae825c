#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs): on a machine with one NVIDIA GPU, after
# ./install.sh --test, under 8 minutes. --dry-run: the same steps on the CPU with the tiny model (CI runs it).
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
exec "$PYTHON" benchmarks/gpu_check.py "$@"
