# Sourced by the launch scripts: create or update the project's virtual environment
# (.venv at the repository root) when requirements.txt or constraints.txt has changed,
# then export PYTHON and PYTHONPATH. Set HARL_PYTHON to choose the interpreter used to
# build it. constraints.txt pins every transitive package (scripts/lock_requirements.sh).
set -euo pipefail
ROOT="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  base="${HARL_PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "setting up $VENV with $base (first use or requirements changed)..." >&2
  [ -x "$VENV/bin/python" ] || "$base" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" >&2
  echo "$want" > "$STAMP"
fi
export PYTHON="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# No cd: relative paths in flags (--results_dir, --config) are taken from the caller's directory.
