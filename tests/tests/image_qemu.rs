//! Cross-checks the built guest image with an independent VMM: the current
//! `capsule image` (kernel, read-only rootfs, command line) plus a fresh
//! writable disk must boot under stock `qemu-system-x86_64 -M microvm` until
//! the agent, as PID 1, reports `capsule-agent: init ok` on the serial console.
//!
//! This pins the image contract independently of our own VMM: if this passes
//! and our VMM fails, the bug is in the VMM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capsule::image::{create_writable_disk, current_image, Flavour, ImageInfo};

/// What the agent prints on the serial console once it is up.
const INIT_OK: &str = "capsule-agent: init ok";
/// Generous: TCG boots of an unpatched kernel take seconds, and the CI machine is slow and shared.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const GUEST_MEMORY_MIB: u32 = 1024;
const WRITABLE_DISK_MIB: u64 = 64;
/// Serial lines quoted when the boot fails.
const TRANSCRIPT_TAIL_LINES: usize = 60;

/// Kills qemu when dropped, so a failing assertion never leaves it running.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The accelerator for this image on this host, or why it cannot run here.
fn accelerator(info: &ImageInfo) -> Result<&'static [&'static str], String> {
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let pvm_host = capsule_vmm::host::is_pvm();
    match info.flavour {
        // qemu 7.2 fails to set IA32_ARCH_CAPABILITIES (MSR 0x10a) on this PVM
        // host and aborts, so that feature is masked.
        Flavour::Pvm if kvm_usable && pvm_host => {
            Ok(&["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", "1"])
        }
        Flavour::Pvm => Err("the pvm image needs a PVM host with /dev/kvm".to_owned()),
        // A standard kernel runs at speed under hardware KVM; on a PVM host KVM
        // would only emulate it, and TCG is much faster than that.
        Flavour::Standard if kvm_usable && !pvm_host => Ok(&["-accel", "kvm", "-cpu", "host"]),
        Flavour::Standard => Ok(&["-accel", "tcg"]),
    }
}

#[test]
fn image_boots_under_qemu_microvm_to_agent_init_ok() {
    let info = match current_image() {
        Ok(info) => info,
        Err(e) => {
            capsule::doctor::skip_without_kvm(&format!("no capsule image built (run capsule image build): {e}"));
            return;
        }
    };
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        return;
    }
    let accel = match accelerator(&info) {
        Ok(accel) => accel,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };

    let dir = tempfile::tempdir().expect("temp dir");
    let rw_disk = dir.path().join("rw.ext4");
    create_writable_disk(&rw_disk, WRITABLE_DISK_MIB).expect("writable disk");

    let mut command = Command::new("qemu-system-x86_64");
    command
        // acpi=off: only then does qemu declare its virtio-mmio devices on the
        // kernel command line, as our VMM does (the kernel has no ACPI).
        .args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
        .args(["-m", &GUEST_MEMORY_MIB.to_string()])
        .args(accel)
        .arg("-kernel")
        .arg(&info.kernel)
        .args(["-append", &info.cmdline])
        .arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none,readonly=on", info.rootfs.display()))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-drive")
        .arg(format!("id=rw,file={},format=raw,if=none", rw_disk.display()))
        .args(["-device", "virtio-blk-device,drive=rw", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start qemu-system-x86_64");
    let serial = child.stdout.take().expect("qemu stdout");
    let errors = child.stderr.take().expect("qemu stderr");
    let qemu = Qemu(child);

    // Serial and qemu's own stderr both feed one channel of lines.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let stderr_tx = lines_tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(serial).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(errors).lines().map_while(Result::ok) {
            if stderr_tx.send(format!("[qemu stderr] {line}")).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let mut transcript = Vec::new();
    let outcome = loop {
        let left = BOOT_DEADLINE.saturating_sub(started.elapsed());
        if left.is_zero() {
            break format!("no `{INIT_OK}` within {BOOT_DEADLINE:?}");
        }
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(INIT_OK);
                transcript.push(line);
                if found {
                    break String::new();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break "qemu exited before the agent reported init ok".to_owned();
            }
        }
    };
    let boot_time = started.elapsed();
    drop(qemu);

    let tail = transcript[transcript.len().saturating_sub(TRANSCRIPT_TAIL_LINES)..].join("\n");
    assert!(
        outcome.is_empty(),
        "{outcome} (image {} {}, accel {accel:?}, {boot_time:?})\n--- serial ---\n{tail}",
        info.version,
        info.flavour
    );
    eprintln!("image {} ({}) reached `{INIT_OK}` under qemu {accel:?} in {boot_time:.2?}", info.version, info.flavour);
}
