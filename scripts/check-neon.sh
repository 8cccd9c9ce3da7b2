#!/usr/bin/env bash
# Check the workspace for aarch64 and run the core crate's kernel tests under qemu, so the NEON paths are
# compiled and checked against their scalar twins on an x86 machine.
#
#   scripts/check-neon.sh [test name filters...]   (default: quant:: backend::)
#
# rustup's aarch64 standard library is not reachable here, so this uses Debian's `rustc-web`
# (a recent rustc) with the matching arm64 `libstd-rust-web-dev`, both fetched with
# `apt-get download` and unpacked under ~/.cache/keyformer/rust-aarch64 (never installed).
# Needs, installed once as root:
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
# Not part of scripts/test.sh: CI machines lack the cross tools. Exits 2 when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in aarch64-linux-gnu-gcc qemu-aarch64 apt-get dpkg; do
    if ! command -v "$tool" >/dev/null; then
        echo "check-neon: '$tool' not found; see the header of $0 for the one-time setup" >&2
        exit 2
    fi
done
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "check-neon: dpkg has no arm64 architecture; run: dpkg --add-architecture arm64 && apt-get update" >&2
    exit 2
fi

cache="${KEYFORMER_CACHE:-$HOME/.cache/keyformer}/rust-aarch64"
version=$(apt-cache policy rustc-web | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "check-neon: apt knows no rustc-web package" >&2
    exit 2
fi
root="$cache/$version"
if [ ! -x "$root/usr/bin/rustc" ]; then
    echo "check-neon: fetching Debian rustc-web $version and its arm64 standard library" >&2
    rm -rf "$root.part" && mkdir -p "$root.part/debs"
    # The toolchain's shared library names its version (libstd-rust-web-1.96); ask apt for it.
    series=$(echo "$version" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
    llvm=$(apt-cache depends "libstd-rust-web-$series" | awk '/Depends: libllvm/ {print $2; exit}')
    (cd "$root.part/debs" && apt-get download -q \
        "rustc-web=$version" "libstd-rust-web-dev=$version" "libstd-rust-web-$series=$version" \
        "libstd-rust-web-dev:arm64=$version" "libstd-rust-web-$series:arm64=$version" "$llvm")
    for deb in "$root.part"/debs/*.deb; do dpkg -x "$deb" "$root.part"; done
    rm -rf "$root.part/debs" && mv "$root.part" "$root"
fi

export RUSTC="$root/usr/bin/rustc"
export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# A separate target directory: artefacts of another rustc would invalidate the main build's.
export CARGO_TARGET_DIR=target/aarch64-check
"$RUSTC" --version
# Everything (CLI and server too) must build for aarch64; the kernels' tests then run.
cargo check -q --workspace --all-targets --target aarch64-unknown-linux-gnu
if [ $# -eq 0 ]; then set -- quant:: backend::; fi
cargo test -q --target aarch64-unknown-linux-gnu -p keyformer --lib -- "$@"
