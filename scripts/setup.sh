#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment at .venv. Idempotent: a second run is quick.
# torch is pinned to 2.13.0: on this kind of machine pip takes the CPU build that lies on disk, where a
# loose range would pull a multi-GB CUDA build. On a GPU machine, install your torch first and skip the pin
# with FPMGM_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if [ "${FPMGM_TORCH:-pin}" != "skip" ] && ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "[setup] installing fpmgm-hf with its dev extras"
"${PIP[@]}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Fashion-MNIST ships as a Debian package (used by the image examples and slow tests).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[setup] warning: could not install dataset-fashion-mnist (image examples will say how)"
fi
# The web demo's browser test (tests/test_app.py) drives Debian's Chromium through its chromedriver; nothing is
# downloaded at test time.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's chromium and chromium-driver (browser test of app.py)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "[setup] warning: could not install chromium + chromium-driver (tests/test_app.py's browser test needs them)"
fi
.venv/bin/python -c "import torch, transformers, fpmgm_hf; print(f'[setup] ready: torch {torch.__version__}, transformers {transformers.__version__}, fpmgm_hf {fpmgm_hf.__version__}')"
