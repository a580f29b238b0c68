#!/usr/bin/env bash
# The chaos suite at full size: worker processes on one throwaway PostgreSQL, while the test
# SIGKILLs and SIGSTOPs workers, terminates backend connections and restarts the server.
#
#   bash scripts/chaos.sh [pytest arguments...]
#
# Runs `bash scripts/test.sh -m chaos -s` (all gates, then only the chaos tests, output shown)
# with a full-size default for each knob; set any of them to override:
#
#   SAGA_CHAOS_RUNS     runs to start                      (here 1000; CI default 200)
#   SAGA_CHAOS_WORKERS  worker processes alive at a time   (here 4; CI default 3; >= 3)
#   SAGA_CHAOS_SEED     seed of everything random          (default random; always printed)
#   SAGA_CHAOS_REPORT   also write the summary JSON here   (default: only the pytest tmp dir)
#
# Replay a failure with the seed it printed: SAGA_CHAOS_SEED=123 bash scripts/chaos.sh
# The normal `bash scripts/test.sh` runs the same test at CI size (about 25 s).
set -euo pipefail

repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"

export SAGA_CHAOS_RUNS="${SAGA_CHAOS_RUNS:-1000}"
export SAGA_CHAOS_WORKERS="${SAGA_CHAOS_WORKERS:-4}"
if [[ -n "${SAGA_CHAOS_SEED:-}" ]]; then
    export SAGA_CHAOS_SEED
fi
if [[ -n "${SAGA_CHAOS_REPORT:-}" ]]; then
    export SAGA_CHAOS_REPORT
fi

exec bash "$repo_root/scripts/test.sh" -m chaos -s "$@"
