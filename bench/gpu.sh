#!/usr/bin/env bash
# The GPU check in one command (bench/gpu.py has the details):
#   bench/gpu.sh --fetch-wheels     here, with internet: the pure-Python wheels the GPU box lacks -> .whl/
#   bench/gpu.sh [--commit C] [--out DIR]   on one H100/H200: every stage in <= 8 minutes -> DIR/results.json
#   bench/gpu.sh --smoke            CPU: the same stages at tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu.py "$@"
