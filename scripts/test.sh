#!/usr/bin/env bash
# Set up the environment, then run the test suite (slow tests too with RUN_SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
