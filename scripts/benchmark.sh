#!/usr/bin/env bash
# Train (or continue) a reproduction suite and regenerate its report, e.g.
#   bash scripts/benchmark.sh configs/benchmarks/mamujoco-10m.yaml [--report | --status] [--max_parallel N] [--ray_address auto]
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export MPLBACKEND=Agg
exec "$PYTHON" -m train.benchmark "$@"
