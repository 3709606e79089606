# Sourced by scripts/demo.sh and scripts/test.sh: make .venv with p2pfs and its
# test dependencies installed (idempotent; reinstalls when pyproject.toml changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "p2pfs needs Python >= 3.11")'
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.p2pfs-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing p2pfs and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e ".[test,bench]" >&2
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
