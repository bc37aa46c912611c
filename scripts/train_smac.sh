#!/usr/bin/env bash
# Train on StarCraft micromanagement. Default: HAPPO on SMAX (jaxmarl, runs on CPU) 3m.
#   bash scripts/train_smac.sh --env smax --map_name 2s3z --algo hatrpo
#   bash scripts/train_smac.sh --env smac --map_name 3s5z    # real SMAC: needs `bash install_sc2.sh`
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# --env smax unless the command names an env, or takes the run's own (--resume, --eval_only).
case " $* " in
  *" --env "*|*" --env="*|*" --resume "*|*" --resume="*|*" --eval_only "*|*" --eval-only "*)
    exec "$PYTHON" -m train.train "$@" ;;
  *) exec "$PYTHON" -m train.train --env smax "$@" ;;
esac
