#!/usr/bin/env bash
# Learning curves + final-performance table for every run under a results directory.
#   bash scripts/plot.sh <results dir> [--metric eval_return|eval_win_rate|train_episode_return|...]
#                        [--out file.png] [--table-only] [--points N] [--title ...]
# Runs `python -m train.plot "$@"` with the repository's virtual environment.
set -euo pipefail

REPO="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "plot.sh: no virtual environment at $REPO/.venv; run 'bash scripts/test.sh' or 'bash scripts/train_mujoco.sh' first (they create it)" >&2
    exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
exec "$PY" -m train.plot "$@"
