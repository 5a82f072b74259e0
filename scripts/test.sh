#!/usr/bin/env bash
# Sets moex up (packages + build) and runs the whole test suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
# What only the tests need: a one-machine Slurm for the `slurm` tests, a Prometheus text parser and
# curl for the `metrics` test (each skips without them).
MOEX_EXTRA_PACKAGES="slurmctld slurmd slurm-client python3-prometheus-client curl ${MOEX_EXTRA_PACKAGES:-}" \
  scripts/setup.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
