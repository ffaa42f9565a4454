#!/usr/bin/env bash
# The full test suite: every Rust test in the workspace (unit, KVM tiny guests,
# Linux boot, agent, in-process MCP), then the end-to-end tests that drive
# `capsule serve` with the official Python MCP SDK over stdio and HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins
cargo test --locked --workspace
python3 -m pytest -q tests/python
