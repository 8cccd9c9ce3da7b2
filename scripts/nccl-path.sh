#!/usr/bin/env bash
# Prints a folder holding libnccl.so for tensor parallelism (`bench --device cuda -tp N`,
# gpu-check's NCCL rows). cudarc looks NCCL up as libnccl.so, while pip's nvidia-nccl wheels
# (PyTorch's) ship only libnccl.so.2: this finds one and links it as libnccl.so in a folder
# of its own. Use: export LD_LIBRARY_PATH=$(scripts/nccl-path.sh):$LD_LIBRARY_PATH
set -euo pipefail
dir=${TMPDIR:-/tmp}/keyformer-nccl
lib=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/ {print $NF; exit}')
if [ -z "$lib" ]; then
    sites=$(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)
    for s in $sites; do
        [ -d "$s/nvidia" ] || continue
        lib=$(find "$s/nvidia" -name 'libnccl.so*' 2>/dev/null | head -1)
        [ -n "$lib" ] && break
    done
fi
if [ -z "$lib" ]; then
    echo "scripts/nccl-path.sh: no libnccl.so found (install NCCL, or pip install nvidia-nccl-cu12)" >&2
    exit 1
fi
mkdir -p "$dir"
ln -sf "$lib" "$dir/libnccl.so"
echo "$dir"
