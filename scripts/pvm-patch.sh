# Sourced by setup.sh and .ci/run: on a PVM host with no patch given, use the
# PVM guest patch shipped beside this repository in ../shared/guest, if present.
if [ -z "${CAPSULE_KERNEL_PATCHES:-}" ] && [ -d /sys/module/kvm_pvm ]; then
  _pvm_patch="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/guest/pvm-native-guest-6.12.117.patch"
  if [ -f "$_pvm_patch" ]; then
    export CAPSULE_KERNEL_PATCHES="$_pvm_patch"
    echo "capsule: PVM host: building the guest kernel with $_pvm_patch" >&2
  fi
  unset _pvm_patch
fi
