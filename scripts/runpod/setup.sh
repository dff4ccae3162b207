#!/usr/bin/env bash
# Install multitune into a virtual environment on this node. Safe to run again.
#   MULTITUNE_VENV  where the venv goes (default: ~/.venvs/multitune, on the node's own disk)
#   PYTHON          interpreter that creates it (default: python3, 3.10 or newer)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv="${MULTITUNE_VENV:-$HOME/.venvs/multitune}"
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first, alone and pinned, so that no other package picks the build (as in the Makefile).
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e .
echo "multitune installed in $venv"
