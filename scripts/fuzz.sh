#!/usr/bin/env bash
# Fuzz every target for SECONDS each (default 3600), with llama.cpp's vocabulary files when
# they are fetched (scripts/fetch-vocab-tests.sh). Failing inputs go to target/fuzz-failures.
#   scripts/fuzz.sh [SECONDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3600}
seed=${2:-$(date +%s)}
KEYFORMER_VOCAB_DIR=$(scripts/fetch-vocab-tests.sh)
export KEYFORMER_VOCAB_DIR
cargo build --release -q -p keyformer-fuzz
echo "seed $seed, $seconds s per target" >&2
target/release/keyformer-fuzz --cases 1000000000000 --seconds "$seconds" --seed "$seed"
