#!/usr/bin/env bash
# Train on StarCraft micromanagement. Default: HAPPO on SMAX (jaxmarl, runs on CPU) 3m.
#   bash scripts/train_smac.sh --env smax --map_name 2s3z --algo hatrpo
#   bash scripts/train_smac.sh --env smac --map_name 3s5z    # real SMAC: needs `bash install_sc2.sh`
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# The env when neither a flag nor a --config file names one (--resume / --eval_only use the
# run's own). Not an --env flag, which would override a --config file's env.
export HARL_DEFAULT_ENV=smax
exec "$PYTHON" -m train.train "$@"
