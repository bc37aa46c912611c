#!/usr/bin/env bash
# Train on Multi-Agent MuJoCo. Default: HAPPO on HalfCheetah 2x3 with its tuned config
# (configs/mamujoco/HalfCheetah-2x3.yaml). Any flag passes through, e.g.
#   bash scripts/train_mujoco.sh --algo hatrpo --scenario Ant --agent_conf 4x2 --seed 3
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# --env mamujoco unless the command names an env, or takes the run's own (--resume, --eval_only).
case " $* " in
  *" --env "*|*" --env="*|*" --resume "*|*" --resume="*|*" --eval_only "*|*" --eval-only "*)
    exec "$PYTHON" -m train.train "$@" ;;
  *) exec "$PYTHON" -m train.train --env mamujoco "$@" ;;
esac
