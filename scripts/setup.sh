#!/usr/bin/env bash
# Sets capsule up on this host: system packages, the release binaries (capsule
# and the static guest agent beside it), and the guest image.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
. ./scripts/pvm-patch.sh

echo "capsule setup: building capsule (release)" >&2
cargo build --release --locked -p capsule
echo "capsule setup: building the static guest agent" >&2
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p capsule-agent
install -m 0755 target/x86_64-unknown-linux-gnu/release/capsule-agent target/release/capsule-agent

./target/release/capsule image build
./target/release/capsule doctor || true
