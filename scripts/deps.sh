#!/usr/bin/env bash
# Installs what capsule needs on a fresh Debian 12 host: the guest image build
# tools (debootstrap, e2fsprogs, Debian's linux-source-6.12 and the kernel build
# dependencies), qemu for the image cross-check, and the Python packages the
# end-to-end tests use (the official `mcp` SDK as a real MCP client).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils patch
  debootstrap e2fsprogs linux-source-6.12 qemu-system-x86 python3-pip
)
# The end-to-end test client (pinned) plus matplotlib/numpy for the host-side
# run_code tests, which run the agent's Python driver on this host.
PIP_ARGS=(-r tests/python/requirements.txt matplotlib numpy)

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

if [ "${CAPSULE_SKIP_PIP:-0}" != "1" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "${PIP_ARGS[@]}" 2>&1 \
    | grep -v -E "^(WARNING: Running pip as the 'root' user|\[notice\])" || true
fi
echo "capsule deps: ok" >&2
