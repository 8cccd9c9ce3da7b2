#!/usr/bin/env bash
# The server's end-to-end checks with OpenAI's Python client (installed here if missing):
# starts real `keyformer serve` processes on loopback. Needs the CLI built (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import openai' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'openai==1.109.1' >&2
fi
python3 crates/keyformer-server/tests/openai_client.py
