#!/usr/bin/env bash
# The Python package's tests (python/tests, pytest): builds and installs it from this checkout
# with `pip install ./python` (maturin, in release mode; the workspace's target/ is reused), then
# checks it against the CLI (built by scripts/test.sh) and the engine's own numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import pytest' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'pytest==8.4.2' >&2
fi
python3 -m pip install --quiet --disable-pip-version-check ./python >&2
# From the repository root: python/keyformer (the sources, without the native module) must not
# shadow the installed package.
python3 -m pytest -q python/tests
