#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh install of requirements.txt alone, so that every
# transitive package is pinned to what that install resolved. Run it after changing
# requirements.txt, then run the tests (bash scripts/test.sh rebuilds .venv from both).
set -euo pipefail
ROOT="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
base="${HARL_PYTHON:-$(command -v python3.11 || command -v python3)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$base" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
{
  echo "# Every package a fresh install of requirements.txt resolved (scripts/lock_requirements.sh,"
  echo "# $("$tmp/venv/bin/python" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")')),"
  echo "# used as pip constraints so a fresh machine gets the same versions after upstream"
  echo "# releases. torch is pinned in requirements.txt only (the local CPU wheel is '+cpu')."
  # --all: setuptools too (torch and gymnasium-robotics need it at run time); pip is the installer's own.
  "$tmp/venv/bin/python" -m pip freeze --all --exclude pip --exclude torch
} > "$ROOT/constraints.txt"
echo "wrote $ROOT/constraints.txt ($(grep -c '==' "$ROOT/constraints.txt") packages)"
