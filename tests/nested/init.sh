#!/bin/busybox sh
# /init of the nested harness's L1 guest (see run.sh): mounts what capsule needs, loads KVM
# (kvm_amd) and the data disk's drivers, runs scenario.sh on the data disk's image, then
# reports what capsule's logs say about its guests (panics and triple faults fail the run;
# TCG's known warnings are listed as expected) and powers off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/shm /dev/pts
mount -t tmpfs shm /dev/shm
while read -r module; do
    insmod "/modules/$module.ko" || echo "NESTED LOG insmod $module failed"
done </modules/order
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
mount -t ext4 /dev/vda /data || echo "NESTED LOG cannot mount the data disk"
[ -c /dev/kvm ] || echo "NESTED LOG no /dev/kvm: $(dmesg | grep -i -E 'kvm|svm' | tail -3)"

export HOME=/root CAPSULE_CACHE_DIR=/data/cache CAPSULE_STATE_DIR=/data/state CAPSULE_ENGINE=kvm
export CAPSULE_LOG=capsule=info
cd /root
sh /scenario.sh
rc=$?

# What capsule and its guests logged: its daemon's log and every VM's serial and worker log.
logs="/tmp/serve.log $(find /data/state -name '*.log' 2>/dev/null)"
# shellcheck disable=SC2086
grep -h -E 'TripleFault|triple fault|Kernel panic|general protection fault|BUG: |Oops: ' $logs 2>/dev/null |
    head -5 | sed 's/^/NESTED LOG PANIC /'
for expected in "XSAVE consistency problem" "APIC timer disabled due to verification failure"; do
    # shellcheck disable=SC2086
    if grep -q -h "$expected" $logs 2>/dev/null; then echo "NESTED LOG expected under TCG: $expected"; fi
done
if [ "$rc" != 0 ]; then
    echo "NESTED LOG the daemon's log, last lines:"
    tail -n 30 /data/state/daemon.log /tmp/serve.log 2>/dev/null | sed 's/^/NESTED LOG   /'
fi
echo "NESTED EXIT $rc"
sync
umount /data 2>/dev/null
poweroff -f
