#!/usr/bin/env bash
# Throughput benchmark on a fixed training workload; the last line is a JSON object.
# Default: HAPPO, HalfCheetah 2x3 tuned config (20 envs x 200 steps, 15 epochs), CPU.
#   bash scripts/bench.sh --algo hatrpo
#   bash scripts/bench.sh --env smax --map_name 3m
#   bash scripts/bench.sh --iterations 20 --n_env_workers 2
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PYTHON" -m train.bench "$@"
