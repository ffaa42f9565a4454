#!/usr/bin/env bash
# The full test suite: formatting and lints, then every Rust test in the
# workspace (unit, KVM tiny guests, Linux boot, agent, in-process MCP), then the
# end-to-end tests that drive `capsule serve` with the official Python MCP SDK
# over stdio and HTTP. It runs right after ./scripts/setup.sh: the Debian packages
# are checked (and installed if missing), and the Python packages the tests use go
# into their own virtual environment (scripts/test-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
. ./scripts/test-env.sh
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  cargo fmt --all --check
  cargo clippy --locked --workspace --tests --benches --bins -- -D warnings
else
  echo "SKIP: format and lint checks: rustfmt or clippy is not installed (rustup component add rustfmt clippy)" >&2
fi
cargo build --locked --workspace --bins
cargo test --locked --workspace
python3 -m pytest -q tests/python
