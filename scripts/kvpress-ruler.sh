#!/usr/bin/env bash
# kvpress beside keyformer on the same RULER cases: makes (once, cached) a Python environment
# with kvpress 0.5.5 and the transformers it supports (< 5.3), sharing the system's torch, then
# runs scripts/kvpress-ruler.py in it with the arguments given (see its --help).
#
#   keyformer eval -m MODEL --data $(scripts/fetch-texts.sh)/paul-graham.jsonl --tasks ruler \
#       --export-cases cases.jsonl --out OUT
#   scripts/kvpress-ruler.sh --cases cases.jsonl --model MODEL.gguf --out kvpress.jsonl
set -euo pipefail
cache=${KEYFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyformer}
venv="$cache/kvpress-venv"
if ! "$venv/bin/python" -c "import kvpress" 2>/dev/null; then
  python3 -m venv --system-site-packages "$venv"
  # kernels 0.11: the newest whose import transformers 5.2 accepts (a newer one in the
  # system's packages makes `import transformers.modeling_utils` fail).
  "$venv/bin/pip" install --quiet "kvpress==0.5.5" "transformers>=5.2,<5.3" "kernels==0.11.*" gguf >&2
fi
exec "$venv/bin/python" "$(dirname "$0")/kvpress-ruler.py" "$@"
