#!/usr/bin/env bash
# The Rust test suite on aarch64 under qemu-user: runs the NEON kernels against the scalar reference
# (Isa::available() detects NEON under qemu), which an x86 machine cannot otherwise do. Needs
#   apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   rustup target add aarch64-unknown-linux-gnu
# Not part of .ci/run (it needs root for apt and the Rust target); about a minute here.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu "$@"
