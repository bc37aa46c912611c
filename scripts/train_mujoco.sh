#!/usr/bin/env bash
# Train on Multi-Agent MuJoCo. Default: HAPPO on HalfCheetah 2x3 with its tuned config
# (configs/mamujoco/HalfCheetah-2x3.yaml). Any flag passes through, e.g.
#   bash scripts/train_mujoco.sh --algo hatrpo --scenario Ant --agent_conf 4x2 --seed 3
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# The env when neither a flag nor a --config file names one (--resume / --eval_only use the
# run's own). Not an --env flag, which would override a --config file's env.
export HARL_DEFAULT_ENV=mamujoco
exec "$PYTHON" -m train.train "$@"
