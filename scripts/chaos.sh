#!/usr/bin/env bash
# Crash-safety acceptance experiment (train/chaos.py): train a configuration uninterrupted,
# then again with SIGKILL at random moments (default 3 times) and --resume after each,
# and check that metrics.csv has no gaps and the same learning metrics. The last line is
# JSON; the exit status is 0 only if every check passes. Any training flag passes through,
# plus --kills N, --chaos_seed S, --chaos_dir DIR, e.g.
#   bash scripts/chaos.sh --scenario HalfCheetah --agent_conf 2x3 --num_env_steps 3000 \
#       --n_rollout_threads 2 --episode_length 50 --hidden_sizes 16,16 --kills 3
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PYTHON" -m train.chaos "$@"
