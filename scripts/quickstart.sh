#!/usr/bin/env bash
# Sets moex up (packages + build) and trains a DeepSeekMoE model on 4 CPU ranks under mpirun.
# Extra arguments go to moex-train, e.g. scripts/quickstart.sh --steps 50 --config examples/configs/tiny-softmax.json
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ranks="${MOEX_RANKS:-4}"
# Open MPI refuses root without these, and 4 ranks on fewer cores need oversubscription.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun -np "$ranks" --oversubscribe build/bin/moex-train --steps 200 --log-every 10 "$@"
