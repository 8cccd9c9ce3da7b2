#!/usr/bin/env bash
# Regenerates tests/golden/ from the independent reference implementations:
#   llama.cpp via llama-cpp-python (token ids, top-5, perplexity on the Q4_1 file),
#   transformers + CPU torch (logits, greedy continuations on the F32 copy),
#   the gguf package (dequantised values), Google's rouge-score (ROUGE test vectors).
# Installs the Python packages it needs with pip; builds llama.cpp once (scripts/build-llamacpp.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check numpy 'gguf==0.19.0' transformers torch \
  accelerate diskcache jinja2 typing_extensions rouge-score
llama=$(scripts/build-llamacpp.sh)
cargo build --release -q -p keyformer-cli
q4=$(target/release/keyformer info | sed -n 's/^file: *\(.*\) ([0-9]* bytes.*/\1/p')
f32=$(tools/reference/f32-copy.sh)
LLAMA_CPP_LIB_PATH="$llama/build/bin" PYTHONPATH="$(echo "$llama"/llama_cpp_python-*)" \
  python3 tools/reference/golden_llamacpp.py "$q4" tests/golden/llamacpp.json
python3 tools/reference/golden_quant.py "$q4" tests/golden/quant.json
python3 tools/reference/golden_rouge.py tests/golden/rouge.json
python3 tools/reference/golden_transformers.py "$f32" tests/golden/llamacpp.json tests/golden
git status --short tests/golden
