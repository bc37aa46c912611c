#!/usr/bin/env bash
# Render a trained run to a video (deterministic episodes of its last checkpoint):
#   bash scripts/render.sh <run dir> [--episodes N] [--out file.mp4|file.gif] [--fps N]
#                          [--width W --height H] [--max_steps N] [--seed S] [--device cpu]
# Default output: <run dir>/video.mp4. MaMuJoCo renders off-screen with MUJOCO_GL=egl
# unless MUJOCO_GL is set (osmesa works where EGL does not). Relative paths are taken
# from the directory the script is called from.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "$PYTHON" -m train.render "$@"
