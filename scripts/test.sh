#!/usr/bin/env bash
# The project's tests: Rust unit/integration tests, then pytest (the package must be installed,
# e.g. `pip install -e ".[test]"`). GPU tests skip where no GPU is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
# Rust formatting (rustfmt.toml), where rustfmt is installed (rustup's default profile has it).
if cargo fmt --version > /dev/null 2>&1; then
  cargo fmt --check || { echo "Rust sources are not formatted: run cargo fmt" >&2; exit 1; }
else
  echo "rustfmt not installed: Rust formatting not checked"
fi
# Lints (the CUDA and Python code included), where clippy is installed.
if cargo clippy --version > /dev/null 2>&1; then
  cargo clippy --release --quiet --all-targets --features cuda,python -- -D warnings
else
  echo "clippy not installed: lints not checked"
fi
cargo test --release --quiet
# The CUDA backend's host-side unit tests (no GPU needed; the others ran above).
cargo test --release --quiet --features cuda --lib backend::cuda
python -m pytest tests -q
