//! Boots the current guest image with our own VMM, in a worker process, and talks to the guest
//! agent (PID 1) over hybrid virtio-vsock: handshake, a shell command, a file round trip and a
//! Python cell. This is the path every KVM sandbox takes.
//!
//! Skips only when /dev/kvm is unusable or no image is built (`capsule image build`).

use std::path::Path;
use std::time::{Duration, Instant};

use capsule::engine::kvm::{
    boot_config, connect_agent, serial_tail, wait_for_serial, SandboxFiles, AGENT_READY_MARKER, AGENT_READY_TIMEOUT,
    SERIAL_TAIL_LINES,
};
use capsule::image::{create_writable_disk, current_image};
use capsule_agent::protocol::{Event, ExecRequest, Language, Op, Reply, RunCodeRequest};
use capsule_vmm::worker::WorkerHandle;
use capsule_vmm::RunState;

const WORKER_EXE: &str = env!("CARGO_BIN_EXE_capsule-tests-worker");
const GUEST_MEMORY_MIB: u64 = 1024;
const WRITABLE_DISK_MIB: u64 = 64;
/// One vCPU: on PVM hosts only the boot CPU runs at native speed, and one is enough here.
const GUEST_VCPUS: u8 = 1;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent may still be finishing its setup after the marker; connecting retries this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))
}

fn console(log: &Path) -> String {
    serial_tail(log, SERIAL_TAIL_LINES)
}

#[test]
fn image_boots_in_our_vmm_and_the_agent_serves_over_vsock() {
    if let Err(why) = kvm_usable() {
        capsule::doctor::skip_without_kvm(&why);
        return;
    }
    let image = match current_image() {
        Ok(image) => image,
        Err(e) => {
            capsule::doctor::skip_without_kvm(&format!("no capsule image built (run `capsule image build`): {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let files = SandboxFiles::new(dir.path());
    create_writable_disk(&files.writable_disk(), WRITABLE_DISK_MIB).expect("writable disk");
    let config = boot_config(&image, &files, GUEST_VCPUS, GUEST_MEMORY_MIB);
    let log = files.serial_log();

    let started = Instant::now();
    let worker = WorkerHandle::spawn(Path::new(WORKER_EXE), config).expect("spawn the worker");
    assert_eq!(worker.start().expect("start"), RunState::Running);
    let ready = wait_for_serial(&log, AGENT_READY_MARKER, AGENT_READY_TIMEOUT);
    assert!(
        ready.is_some(),
        "no `{AGENT_READY_MARKER}` within {AGENT_READY_TIMEOUT:?} (image {} {}); worker event: {:?}\n--- serial ---\n{}",
        image.version,
        image.flavour,
        worker.wait_event(Duration::ZERO),
        console(&log)
    );
    let to_ready = started.elapsed();

    let client = connect_agent(&files.vsock_uds(), &log, CONNECT_TIMEOUT, || match worker.wait_event(Duration::ZERO) {
        Some(event) => Err(format!("{event:?}")),
        None => Ok(()),
    })
    .unwrap_or_else(|e| panic!("handshake over vsock: {e}"));
    let to_handshake = started.elapsed();

    // A shell command, its output and exit code.
    let out = client
        .exec(ExecRequest::shell("echo capsule-$((6 * 7)); uname -s; echo to-stderr >&2; exit 3"), Some(CALL_TIMEOUT))
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "capsule-42\nLinux\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    assert_eq!(out.status.code, Some(3), "{:?}", out.status);

    // The root is the overlay the agent built from /dev/vda (read-only) and /dev/vdb.
    let mounts =
        client.exec(ExecRequest::shell("cat /proc/mounts"), Some(CALL_TIMEOUT)).expect("exec cat /proc/mounts");
    let mounts = String::from_utf8_lossy(&mounts.stdout).into_owned();
    assert!(mounts.lines().any(|l| l.starts_with("overlay / overlay ")), "the root is not an overlay:\n{mounts}");

    // A file round trip through the overlay root, seen by the guest's own tools too.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let written = client.write_file("/root/roundtrip/data.bin", &data, Some(0o600)).expect("write_file");
    assert_eq!(written, data.len() as u64);
    assert_eq!(client.read_file("/root/roundtrip/data.bin").expect("read_file"), data);
    let wc = client.exec(ExecRequest::shell("wc -c < /root/roundtrip/data.bin"), Some(CALL_TIMEOUT)).expect("exec wc");
    assert_eq!(String::from_utf8_lossy(&wc.stdout).trim(), data.len().to_string());

    // A Python cell: the value of the last expression comes back.
    let (events, reply) = client
        .call(
            Op::RunCode(RunCodeRequest {
                context: "default".into(),
                language: Language::Python,
                code: "1+1".into(),
                output_cap_bytes: None,
                limits: None,
            }),
            Some(CALL_TIMEOUT),
        )
        .expect("run_code");
    assert!(matches!(reply, Reply::CodeDone(_)), "{reply:?}");
    let main_result = events.iter().find_map(|event| match event {
        Event::Result(result) if result.is_main_result => result
            .data
            .iter()
            .find(|(mime, _)| mime == "text/plain")
            .map(|(_, text)| String::from_utf8_lossy(text).into_owned()),
        _ => None,
    });
    assert_eq!(main_result.as_deref(), Some("2"), "events: {events:?}");

    client.close();
    worker.stop().expect("stop the worker");
    eprintln!(
        "image {} ({}): worker spawn to `{AGENT_READY_MARKER}` {} ms, to handshake {} ms",
        image.version,
        image.flavour,
        to_ready.as_millis(),
        to_handshake.as_millis()
    );
}
