#!/usr/bin/env bash
# Install Debian's chromium for the browser test of the Argilla UI (tests/test_annotation_ui.py), which
# drives /usr/bin/chromium through Playwright's Python package (no browser download).
#
# Idempotent: does nothing when /usr/bin/chromium exists. Installs with apt-get as root, or through
# `sudo -n` (no password prompt) when available; otherwise says what to run and exits non-zero.
#
# Usage: bash annotation/setup_browser.sh
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "chromium present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "error: $CHROMIUM is missing and this user can neither install packages as root nor use sudo" >&2
    echo "       without a password. Ask an administrator to run:" >&2
    echo "           apt-get update && apt-get install -y --no-install-recommends chromium" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $CHROMIUM is missing and there is no apt-get here: install chromium with the system's" >&2
    echo "       package manager so that $CHROMIUM exists" >&2
    exit 1
fi

echo "installing chromium (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium

if [[ ! -x "$CHROMIUM" ]]; then
    echo "error: the chromium package did not provide $CHROMIUM" >&2
    exit 1
fi
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
