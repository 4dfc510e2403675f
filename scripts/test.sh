#!/usr/bin/env bash
# The project's tests: Rust unit/integration tests, then pytest (the package must be installed,
# e.g. `pip install -e ".[test]"`). GPU tests skip where no GPU is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --quiet
python -m pytest tests -q
