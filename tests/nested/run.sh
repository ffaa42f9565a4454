#!/usr/bin/env bash
# The standard flavour under capsule's own VMM on a host with hardware virtualization,
# emulated: qemu's TCG emulates AMD-V (`-cpu max` has svm and npt), so a stock Debian kernel in
# an L1 guest loads kvm_amd, and capsule runs inside that L1 on a real /dev/kvm with the
# standard image. (TCG emulates no VT-x: the kvm_intel path is not covered here.)
#
# It builds everything from Debian packages and this checkout's release binaries:
#   - the standard-flavour image, in its own cache (the host's current image is left alone;
#     the host cache's Debian tree is hard-linked in when it has the same key);
#   - L1: Debian's cloud kernel (linux-image-6.12-cloud-amd64, else linux-image-cloud-amd64)
#     with the modules it needs, busybox-static, the release `capsule` with its libraries, and
#     tests/nested/init.sh and scenario.sh, as an initramfs; the image on an ext4 data disk;
# then boots L1 under `qemu-system-x86_64 -accel tcg -cpu CPU -smp N`, where init.sh runs
# scenario.sh (an MCP session over stdio: the tools, pause/resume, fork with the parent used
# afterwards, a template restore, a 2-vCPU sandbox when N >= 2, a server restart), and prints
# each step's outcome and time. It fails on a failed step, a kernel panic or oops in L1, or a
# triple fault or panic in capsule's logs. Warnings that are TCG's limits ("XSAVE consistency
# problem": qemu's SVM has no XSETBV intercept; "APIC timer disabled due to verification
# failure") are expected and listed, not failed on.
#
# Usage: tests/nested/run.sh [--cpu max|max,-xsave] [--smp N] [--tcg-thread multi|single]
#                            [--soak SECONDS] [--timeout SECONDS]
# --soak adds a step that forks the running parent and uses both in turn for that long.
# Exit status: 0 passed; 1 a step failed, or a panic, oops or triple fault; 2 not set up;
# 3 L1 froze (its console silent for longer than any step's own timeout: an L1 kernel or
# emulator hang, which a user-space VMM in L2 cannot cause without a bug beneath it).
# Needs: ./scripts/setup.sh first (the release binaries), root (debootstrap, on a first image
# build), qemu-system-x86, cpio, xz-utils, e2fsprogs, apt (scripts/deps.sh installs them).
# Work files: $CAPSULE_NESTED_DIR, default ~/.cache/capsule-nested (kept between runs).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CPU=max
SMP=1
THREAD=multi
SOAK_S=0
# L1 silent this long (no console line) means L1 itself froze: the scenario's own reply
# timeout (NESTED_READ_TIMEOUT_S, 180 s) would have printed a failed step well before.
SILENT_S=420
MEM_MIB=6144
TIMEOUT_S=1800
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU="$2"; shift 2 ;;
    --smp) SMP="$2"; shift 2 ;;
    --tcg-thread) THREAD="$2"; shift 2 ;;
    --soak) SOAK_S="$2"; shift 2 ;;
    --timeout) TIMEOUT_S="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "nested: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "nested: $*" >&2; }

CAPSULE="$ROOT/target/release/capsule"
if [ ! -x "$CAPSULE" ] || [ ! -x "$ROOT/target/release/capsule-agent" ]; then
  say "no release capsule and capsule-agent in target/release: run ./scripts/setup.sh first"
  exit 2
fi
for tool in qemu-system-x86_64 cpio xz strings strip mkfs.ext4 dpkg-deb apt-get apt-cache ldd; do
  command -v "$tool" >/dev/null || { say "$tool is missing (./scripts/deps.sh installs it)"; exit 2; }
done

WORK="${CAPSULE_NESTED_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capsule-nested}"
CACHE="$WORK/cache"
mkdir -p "$CACHE/base" "$WORK/debs"
started=$(date +%s)

# 1. The standard image, in the harness's own cache.
HOST_CACHE="${CAPSULE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capsule}"
for tree in "$HOST_CACHE"/base/*/; do
  [ -f "$tree/base.json" ] || continue
  key="$(basename "$tree")"
  [ -e "$CACHE/base/$key" ] || cp -al "$tree" "$CACHE/base/$key" 2>/dev/null || rm -rf "$CACHE/base/$key"
done
say "standard image (cache $CACHE)"
env -u CAPSULE_KERNEL_PATCHES "$CAPSULE" image build --flavour standard --cache-dir "$CACHE" >&2
IMAGE_JSON="$CACHE/current.json"
grep -q '"flavour": "standard"' "$IMAGE_JSON" || { say "the image in $CACHE is not the standard flavour"; exit 1; }

# 2. L1's kernel and busybox, from the host's Debian sources.
KPKG=""
for meta in linux-image-6.12-cloud-amd64 linux-image-cloud-amd64; do
  KPKG="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  [ -n "$KPKG" ] && break
done
[ -n "$KPKG" ] || { say "no Debian cloud kernel package in this host's apt sources"; exit 1; }
fetch_deb() {
  local deb
  deb="$(ls "$WORK/debs/$1"_*.deb 2>/dev/null | head -1 || true)"
  if [ -z "$deb" ]; then
    (cd "$WORK/debs" && apt-get download "$1" >&2)
    deb="$(ls "$WORK/debs/$1"_*.deb | head -1)"
  fi
  echo "$deb"
}
KDEB="$(fetch_deb "$KPKG")"
BDEB="$(fetch_deb busybox-static)"
say "L1 kernel $(basename "$KDEB"), $(basename "$BDEB")"

L1="$WORK/l1"
rm -rf "$L1"
mkdir -p "$L1/pkg" "$L1/initrd"/{bin,modules,etc,root,proc,sys,dev,tmp,data}
dpkg-deb -x "$KDEB" "$L1/pkg"
dpkg-deb -x "$BDEB" "$L1/busybox"
KVER="$(ls "$L1/pkg/lib/modules" | head -1)"
VMLINUZ="$L1/pkg/boot/vmlinuz-$KVER"
MODDIR="$L1/pkg/lib/modules/$KVER"

# Modules, dependencies first (from each module's own `depends=`, so no depmod is needed),
# decompressed: busybox's insmod takes plain .ko files.
declare -A LOADED=()
ORDER=()
module_path() {
  awk -v m="$1" '{n=$0; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); if (n == m) {print; exit}}' \
    "$MODDIR/modules.order"
}
add_module() {
  local name="${1//-/_}" path file dep
  [ -n "${LOADED[$name]:-}" ] && return 0
  LOADED[$name]=1
  path="$(module_path "$name")"
  if [ -z "$path" ]; then
    grep -q "/$name.ko\|/${name//_/-}.ko" "$MODDIR/modules.builtin" ||
      say "module $name is neither a module nor built in; L1 may lack it"
    return 0
  fi
  file="$(ls "$MODDIR/$path"* | head -1)"
  case "$file" in
    *.xz) xz -dc "$file" >"$L1/initrd/modules/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$L1/initrd/modules/$name.ko" ;;
    *) cp "$file" "$L1/initrd/modules/$name.ko" ;;
  esac
  for dep in $(strings "$L1/initrd/modules/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
    add_module "$dep"
  done
  ORDER+=("$name")
}
for m in virtio_pci virtio_blk ext4 kvm_amd; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$L1/initrd/modules/order"

# The initramfs: busybox, init, the scenario, capsule and its libraries.
cp "$L1/busybox/bin/busybox" "$L1/initrd/bin/busybox"
install -m 0755 "$ROOT/tests/nested/init.sh" "$L1/initrd/init"
install -m 0755 "$ROOT/tests/nested/scenario.sh" "$L1/initrd/scenario.sh"
# Without its debug information: the initramfs is unpacked by an emulated CPU.
strip --strip-debug -o "$L1/initrd/bin/capsule" "$CAPSULE"
# The host tools capsule runs: mkfs.ext4 (new writable disks) and GNU cp (sparse, reflinked
# disk copies; busybox's cp has neither option), in /usr, ahead of busybox on PATH.
mkdir -p "$L1/initrd/usr/bin" "$L1/initrd/usr/sbin"
cp -L "$(command -v mkfs.ext4)" "$L1/initrd/usr/sbin/mkfs.ext4"
cp -L "$(command -v cp)" "$L1/initrd/usr/bin/cp"
for binary in "$CAPSULE" "$L1/initrd/usr/sbin/mkfs.ext4" "$L1/initrd/usr/bin/cp"; do
  for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$L1/initrd$(dirname "$lib")"
    cp -L "$lib" "$L1/initrd$lib"
  done
done
echo "root:x:0:0:root:/root:/bin/sh" >"$L1/initrd/etc/passwd"
echo "root:x:0:" >"$L1/initrd/etc/group"
: >"$L1/initrd/etc/resolv.conf"
(cd "$L1/initrd" && find . | cpio -o -H newc --quiet) | gzip -1 >"$L1/initrd.gz"

# The data disk: the image (current.json pointing at where L1 mounts it), room for state.
STAGE="$L1/data"
mkdir -p "$STAGE/cache/kernel" "$STAGE/cache/rootfs" "$STAGE/state"
chmod 700 "$STAGE/state"
KERNEL="$(sed -n 's/.*"kernel": "\(.*\)".*/\1/p' "$IMAGE_JSON")"
ROOTFS="$(sed -n 's/.*"rootfs": "\(.*\)".*/\1/p' "$IMAGE_JSON")"
ln "$KERNEL" "$STAGE/cache/kernel/vmlinux" 2>/dev/null || cp "$KERNEL" "$STAGE/cache/kernel/vmlinux"
ln "$ROOTFS" "$STAGE/cache/rootfs/rootfs.ext4" 2>/dev/null || cp --sparse=always "$ROOTFS" "$STAGE/cache/rootfs/rootfs.ext4"
sed -e "s#\"kernel\": \".*\"#\"kernel\": \"/data/cache/kernel/vmlinux\"#" \
  -e "s#\"rootfs\": \".*\"#\"rootfs\": \"/data/cache/rootfs/rootfs.ext4\"#" "$IMAGE_JSON" >"$STAGE/cache/current.json"
DISK="$WORK/data.img"
rm -f "$DISK"
truncate -s 16G "$DISK"
mkfs.ext4 -q -F -L nested-data -d "$STAGE" "$DISK"
say "L1 built in $(($(date +%s) - started)) s: kernel $KVER, modules ${ORDER[*]}"

# 3. Boot L1 under TCG with AMD-V and run the scenario.
LOG="$WORK/console-$(echo "$CPU" | tr -c 'a-z0-9\n' '_')-smp$SMP-$THREAD.log"
say "booting L1: -accel tcg,thread=$THREAD -cpu $CPU -smp $SMP -m $MEM_MIB (console: $LOG)"
boot_started=$(date +%s)
: >"$LOG"
timeout "$TIMEOUT_S" qemu-system-x86_64 -accel "tcg,thread=$THREAD" -cpu "$CPU" -smp "$SMP" -m "$MEM_MIB" \
  -machine q35 -display none -monitor "unix:$WORK/monitor.sock,server=on,wait=off" -serial stdio -no-reboot \
  -nic none -kernel "$VMLINUZ" -initrd "$L1/initrd.gz" \
  -append "console=ttyS0 panic=-1 loglevel=4 nested_soak_s=$SOAK_S nested_read_timeout_s=180" \
  -drive "file=$DISK,if=virtio,format=raw,cache=unsafe" </dev/null >"$LOG" 2>&1 &
qemu_pid=$!
tail -n +1 -f "$LOG" --pid "$qemu_pid" | grep --line-buffered -a '^NESTED' >&2 &
froze=0
while kill -0 "$qemu_pid" 2>/dev/null; do
  sleep 5
  if [ $(($(date +%s) - $(stat -c %Y "$LOG"))) -gt "$SILENT_S" ]; then
    say "L1's console has been silent for over ${SILENT_S}s: L1 froze; its registers:"
    timeout 10 python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(0.5); s.recv(65536)
s.sendall(b"info registers\n"); time.sleep(1); print(s.recv(65536).decode(errors="replace"))' \
      "$WORK/monitor.sock" 2>/dev/null | grep -a 'RIP=\|CR3=' >&2 || true
    froze=1
    kill "$qemu_pid" 2>/dev/null
    break
  fi
done
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
sleep 1
took=$(($(date +%s) - boot_started))

# 4. The verdict.
echo
echo "| step | outcome | time |"
echo "|---|---|---|"
grep -a '^NESTED STEP ' "$LOG" | tr -d '\r' | awk '{ why=""; for (i = 7; i <= NF; i++) why = why " " $i; printf "| %s | %s%s | %s ms |\n", $3, $4, why, $5 }'
echo
failed=0
if [ "$qemu_rc" = 124 ]; then say "L1 ran past ${TIMEOUT_S}s"; failed=1; fi
if [ "$froze" = 1 ]; then failed=3; fi
grep -aq '^NESTED DONE pass=[0-9]* fail=0' "$LOG" || { say "the scenario did not finish cleanly"; failed=1; }
grep -aq '^NESTED EXIT 0' "$LOG" || { say "L1's init did not report success"; failed=1; }
if grep -aE 'Kernel panic|general protection fault|BUG: |Oops: |TripleFault|triple fault|^NESTED LOG PANIC' "$LOG" | head -5 >&2; then
  say "a panic, an oops or a triple fault (above)"
  failed=1
fi
for expected in "XSAVE consistency problem" "APIC timer disabled due to verification failure"; do
  if grep -aq "$expected" "$LOG"; then say "expected under TCG: \"$expected\""; fi
done
say "cpu $CPU, smp $SMP: L1 boot and scenario $took s, everything $(($(date +%s) - started)) s"
if [ "$failed" != 0 ]; then
  say "FAILED; the console is in $LOG"
  [ "$failed" = 3 ] && exit 3
  exit 1
fi
say "passed"
