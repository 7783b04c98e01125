#!/usr/bin/env bash
# Installs everything the project and its tests need into ./.venv (idempotent; safe to re-run).
#   - torch 2.14.1 + torchaudio 2.11.0 (served from the local mirror here; on other machines pip may
#     download the CUDA build: set KEYFACE_TORCH_SPEC to choose another pair, e.g. "torch torchaudio"),
#   - this package in editable mode with its test and face-detection extras,
#   - for the browser test of the web widget: Debian's chromium and playwright-core from npm
#     (skipped with a warning when apt-get or npm is unavailable; that test then skips).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${KEYFACE_TORCH_SPEC:-"torch==2.14.1 torchaudio==2.11.0"}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
.venv/bin/python -m pip install -q -e ".[test,face]"

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
