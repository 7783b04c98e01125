#!/usr/bin/env bash
# Installs everything the project and its tests need into ./.venv (idempotent; safe to re-run).
#   - torch 2.14.1 + torchaudio 2.11.0 (KEYFACE_TORCH_SPEC chooses another pair, e.g. "torch torchaudio"):
#     the CPU build from the PyTorch CPU index when the machine has no NVIDIA GPU (no nvidia-smi), else pip's
#     default index (the CUDA build). KEYFACE_TORCH_INDEX=<index URL> forces an index ("default": pip's own);
#     an unreachable CPU index falls back to the default with one line saying so,
#   - this package in editable mode with its test, face-detection and evaluation-plot extras,
#   - for the browser test of the web widget: Debian's chromium and playwright-core from npm
#     (skipped with a warning when apt-get or npm is unavailable; that test then skips).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${KEYFACE_TORCH_SPEC:-"torch==2.14.1 torchaudio==2.11.0"}
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

TORCH_INDEX=${KEYFACE_TORCH_INDEX:-}
if [ -z "$TORCH_INDEX" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        TORCH_INDEX=default
    elif .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
        "$CPU_TORCH_INDEX" >/dev/null 2>&1; then
        TORCH_INDEX=$CPU_TORCH_INDEX
    else
        echo "no NVIDIA GPU found but the CPU build index $CPU_TORCH_INDEX is unreachable: installing torch from pip's default index" >&2
        TORCH_INDEX=default
    fi
fi
TORCH_INDEX_ARGS=()
if [ "$TORCH_INDEX" != default ]; then
    TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX")
fi
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q "${TORCH_INDEX_ARGS[@]}" $TORCH_SPEC
.venv/bin/python -m pip install -q -e ".[test,face,eval,ray]"

if [ -f tests/web/package.json ]; then
    if ! command -v chromium >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
                || echo "warning: could not install chromium; the web widget test will be skipped" >&2
        else
            echo "warning: chromium not found and apt-get unavailable; the web widget test will be skipped" >&2
        fi
    fi
    if command -v npm >/dev/null 2>&1; then
        (cd tests/web && npm ci --no-audit --no-fund --silent) \
            || echo "warning: npm ci failed in tests/web; the web widget test will be skipped" >&2
    else
        echo "warning: npm not found; the web widget test will be skipped" >&2
    fi
fi
echo "install complete: run the tests with  .venv/bin/python -m pytest"
