#!/usr/bin/env bash
# The main job on built-in defaults: a real architecture search over all six axes on MQAR (CPU, no network),
# ending with the leaderboard. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # small models: one thread per process is fastest and never oversubscribes
exec miras search search_spaces/quickstart.yaml "$@"
