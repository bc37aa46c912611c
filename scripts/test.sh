#!/usr/bin/env bash
# Set up the environment on first use, then run the test suite (extra args go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PYTHON" -m pytest -q tests "$@"
