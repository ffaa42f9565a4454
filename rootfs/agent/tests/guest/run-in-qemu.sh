#!/usr/bin/env bash
# Runs capsule-agent's own test binaries inside a real guest: a qemu microvm
# booting KERNEL (a vmlinux built from rootfs/kernel/*.config, so cgroup v2
# with the pids and memory controllers is there) over a copy of the cached
# image's root filesystem, with CAPSULE_REQUIRE_CGROUPS=1 so that no
# containment test may skip.
#
#   rootfs/agent/tests/guest/run-in-qemu.sh KERNEL [TEST...] [-- ARGS...]
#
# TEST names test binaries (containment, pid1, interactive, exec, …; default:
# containment pid1 interactive exec); ARGS go to each (e.g. a test name
# filter, or --ignored --nocapture for spawn_cost). The image is read from
# ~/.cache/capsule/current.json and never modified (a copy is booted).
# Needs qemu-system-x86_64, debugfs and mkfs.ext4. On a PVM host the kernel
# must be the pvm flavour; elsewhere add QEMU_ACCEL=tcg for a stock kernel.
# (Here, on a PVM host, qemu microvm hung before the first console line with
# -m 2048 and booted with 1536: hence the default GUEST_MEMORY_MIB.)
set -euo pipefail

kernel=${1:?usage: $0 KERNEL [TEST...] [-- ARGS...]}
shift
tests=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
args=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(containment pid1 interactive exec)

repo=$(cd "$(dirname "$0")/../../../.." && pwd)
rootfs=$(python3 -c 'import json, os; print(json.load(open(os.path.expanduser("~/.cache/capsule/current.json")))["rootfs"])')
work=$(mktemp -d "${TMPDIR:-/tmp}/capsule-guest-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/payload/tests"

cd "$repo"
cargo test -p capsule-agent --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys, shutil
wanted = set(sys.argv[2:])
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    name = m["target"]["name"]
    if m["profile"]["test"] and name in wanted:
        shutil.copy(m["executable"], sys.argv[1] + "/tests/" + name)
    elif m["target"]["kind"] == ["bin"] and name == "capsule-agent" and not m["profile"]["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/capsule-agent")
' "$work/payload" "${tests[@]}"
agent_path=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/capsule-agent
printf '%s\n' "${tests[@]}" > "$work/payload/list"
printf '%s\n' "${args[@]+"${args[@]}"}" > "$work/payload/args"
echo "$agent_path" > "$work/payload/agent-path"
mkfs.ext4 -q -d "$work/payload" "$work/payload.ext4" 1G

cat > "$work/init" <<'INIT'
#!/bin/bash
# PID 1 of the test guest: the API filesystems, cgroup v2 with the
# controllers delegated from the root, then every test binary in turn.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mkdir -p /dev/pts /dev/shm; mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
mkdir -p /opt/capsule-tests; mount -o ro /dev/vdb /opt/capsule-tests
agent=$(cat /opt/capsule-tests/agent-path); mkdir -p "$(dirname "$agent")"; cp /opt/capsule-tests/capsule-agent "$agent"
mapfile -t args < /opt/capsule-tests/args
echo "GUEST-BEGIN kernel $(uname -r), $(grep MemTotal /proc/meminfo | tr -s ' '), pid_max $(cat /proc/sys/kernel/pid_max), threads-max $(cat /proc/sys/kernel/threads-max), controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
cd /tmp
while read -r t; do
    echo "GUEST-RUN $t"
    CAPSULE_REQUIRE_CGROUPS=1 RUST_BACKTRACE=1 "/opt/capsule-tests/tests/$t" --test-threads=1 "${args[@]}" 2>&1
    echo "GUEST-RESULT $t $?"
done < /opt/capsule-tests/list
echo GUEST-END
python3 -c 'import ctypes; c = ctypes.CDLL(None); c.sync(); c.reboot(0x01234567)'
INIT
cp "$rootfs" "$work/root.ext4"
debugfs -w -R "write $work/init /capsule-test-init" "$work/root.ext4" >/dev/null 2>&1
debugfs -w -R "set_inode_field /capsule-test-init mode 0100755" "$work/root.ext4" >/dev/null 2>&1

timeout "${GUEST_TIMEOUT_S:-3600}" qemu-system-x86_64 -M microvm,acpi=off -accel "${QEMU_ACCEL:-kvm}" -cpu "${QEMU_CPU:-host,-arch-capabilities}" -smp 1 -m "${GUEST_MEMORY_MIB:-1536}" \
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
    -kernel "$kernel" \
    -append "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/capsule-test-init panic=-1 reboot=t quiet clocksource=kvm-clock nopcid noinvpcid" \
    -drive id=root,file="$work/root.ext4",format=raw,if=none -device virtio-blk-device,drive=root \
    -drive id=tests,file="$work/payload.ext4",format=raw,if=none,readonly=on -device virtio-blk-device,drive=tests \
    | tee "$work/console.log"
grep -q '^GUEST-END' "$work/console.log" || { echo "the guest did not finish its tests" >&2; exit 1; }
! grep -E '^GUEST-RESULT .* [1-9][0-9]*$' "$work/console.log"
