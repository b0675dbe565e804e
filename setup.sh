#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with the pinned packages (requirements.lock)
# and the package itself (editable), plus Chromium for the MLflow-UI test when this is a
# Debian/Ubuntu machine we may install on (root or passwordless sudo). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    if $SUDO true 2>/dev/null; then
      echo "setup: installing Chromium (headless MLflow UI test)"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
      echo "setup: no root: skipping Chromium (the MLflow UI test will be skipped)"
    fi
  else
    echo "setup: no apt-get: install Chromium yourself for the MLflow UI test"
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -c requirements.lock -e ".[dev]"
echo "setup: done; activate with 'source .venv/bin/activate' or prefix commands with .venv/bin/"
