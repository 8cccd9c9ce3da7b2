#!/usr/bin/env python3
"""Compile the CUDA backend's kernels with NVRTC on a machine without a GPU: catches syntax and
PTX-assembly errors before a device call, and prints each kernel's registers, spills and shared
memory (ptxas's report), the numbers that decide how many blocks fit an SM. The backend hands
PTX to the driver, whose JIT may allocate a little differently; the counts are a guide.

    tools/nvrtc/compile_kernels.py [--arch sm_90] [SOURCE ...]

The sources default to the backend's, joined in the order mod.rs joins them (KERNEL_SOURCES).

Needs NVRTC's shared library: the `nvidia-cuda-nvrtc` wheel from PyPI, fetched once with
`pip download --no-deps` and unpacked into $KEYFORMER_CACHE/nvrtc (default ~/.cache/keyformer/nvrtc).
"""
import argparse
import ctypes
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(os.environ.get("KEYFORMER_CACHE", os.path.expanduser("~/.cache/keyformer")), "nvrtc")


def nvrtc_library():
    found = glob.glob(os.path.join(CACHE, "**/libnvrtc.so*"), recursive=True)
    found = [f for f in found if "builtins" not in f]
    if not found:
        os.makedirs(CACHE, exist_ok=True)
        print("fetching nvidia-cuda-nvrtc with pip (first use only)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", CACHE,
                        "nvidia-cuda-nvrtc==13.5.37"], check=True)
        for wheel in glob.glob(os.path.join(CACHE, "*.whl")):
            zipfile.ZipFile(wheel).extractall(CACHE)
        found = [f for f in glob.glob(os.path.join(CACHE, "**/libnvrtc.so*"), recursive=True) if "builtins" not in f]
    return ctypes.CDLL(found[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = os.path.join(ROOT, "crates/keyformer/src/backend/cuda")
    ap.add_argument("source", nargs="*",
                    default=[os.path.join(cuda, f) for f in ("kernels.cu", "quant_blocks.cuh", "quant.cu", "flash.cu")])
    ap.add_argument("--arch", default="sm_90", help="the GPU's architecture (H100/H200: sm_90)")
    a = ap.parse_args()
    lib = nvrtc_library()
    prog = ctypes.c_void_p()
    src = b"\n".join(open(f, "rb").read() for f in a.source)
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    # The options the backend compiles with (backend/cuda/mod.rs), plus ptxas's report.
    opts = [f"--gpu-architecture={a.arch}".encode(), b"--std=c++17", b"--ptxas-options=--verbose"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    if rc != 0:
        print(text)
        sys.exit(f"compilation failed (nvrtc status {rc})")
    # One line per kernel: name, registers, spills, shared memory.
    kernel, spills = None, ""
    for line in text.splitlines():
        if "Compiling entry function" in line:
            kernel, spills = line.split("'")[1], ""
        elif "spill stores" in line and kernel:
            spills = line.split(",")[1].strip()
        elif line.startswith("ptxas info    : Used") and kernel:
            print(f"{kernel:32} {line.split(':', 1)[1].strip()}; {spills}")
            kernel = None
        elif "warning" in line:
            print(line)
    print(f"compiled for {a.arch}: ok")


if __name__ == "__main__":
    main()
