#!/bin/sh
# Make sure headless Chromium is available for the report tests (tests/doctor/test_report.py).
# Installs Debian's `chromium` package with apt-get only when `chromium` is not already on PATH.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "ensure_chromium.sh: chromium is missing and installing it needs root (or sudo)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Try the install from the existing package lists first; update them only if that fails.
if ! $SUDO apt-get install -y --no-install-recommends chromium; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium
fi
command -v chromium >/dev/null 2>&1 || { echo "ensure_chromium.sh: chromium still not on PATH" >&2; exit 1; }
