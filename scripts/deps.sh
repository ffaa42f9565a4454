#!/usr/bin/env bash
# Installs the Debian packages capsule needs on a fresh Debian 12 host: the guest
# image build tools (debootstrap, e2fsprogs, Debian's linux-source-6.12 and the
# kernel build dependencies), qemu for the image cross-check, nodejs for the
# agent's JavaScript driver tests, npm (for npx, the MCP inspector CLI test) where nodejs has
# no npx of its own, iproute2 for the network tests' namespaces, and python3-venv
# for the test suite's own Python environment (scripts/test-env.sh). Packages
# already installed are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils patch
  debootstrap e2fsprogs linux-source-6.12 qemu-system-x86 python3-venv nodejs iproute2
)
# Debian's nodejs leaves npx to the npm package; NodeSource's has it (and conflicts with npm).
command -v npx >/dev/null 2>&1 || APT_PACKAGES+=(npm)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "capsule deps: installing apt packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "capsule deps: ok" >&2
