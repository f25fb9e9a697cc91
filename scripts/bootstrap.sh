#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the tested pin set (constraints.txt).
# torch 2.14.1 + torchvision 0.29.1 are taken from the machine's local wheel store when it has one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip check
  rm -f .venv/.installed-*
  touch "$stamp"
fi
