//! The worker process: one VM per process, driven over the control socket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use capsule_vmm::devices::legacy::i8042::ResetSource;
use capsule_vmm::worker::{ControlSocket, VmEnded, WorkerError, WorkerEvent, WorkerHandle};
use capsule_vmm::{RunState, VmConfig, VmEvent};
use common::{elf_payload, kvm_usable, test_guest, TestInit, INIT_MARKER};

const WORKER_EXE: &str = env!("CARGO_BIN_EXE_capsule-vmm-worker");
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// `loop: inc qword [0x5000]; jmp loop`
const COUNTER_LOOP: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];

fn counter_config(kernel: &Path) -> VmConfig {
    let mut config = VmConfig::new(kernel, "");
    config.mem_mib = 64;
    config
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn worker_boots_the_guest_kernel_and_reports_the_reboot() {
    let Some(guest) = test_guest(TestInit::REBOOT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut config = guest.config();
    config.mem_mib = 512;
    config.serial_log = Some(log.clone());
    let started = Instant::now();
    let worker = WorkerHandle::spawn(Path::new(WORKER_EXE), config).unwrap();
    assert_eq!(worker.start().unwrap(), RunState::Running);
    let event = worker.wait_event(BOOT_TIMEOUT);
    let elapsed = started.elapsed();
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert_eq!(event, Some(WorkerEvent::Vm(VmEvent::Reset { source: ResetSource::I8042 })), "console:\n{console}");
    assert!(console.contains(INIT_MARKER), "console:\n{console}");
    assert_eq!(worker.status().unwrap(), RunState::Stopped);
    worker.stop().unwrap();
    assert_eq!(worker.wait_event(Duration::from_secs(5)), Some(WorkerEvent::Exited { pid: worker.pid() }));
    assert!(!process_exists(worker.pid()));
    eprintln!("worker: spawn to guest reboot {} ms", elapsed.as_millis());
}

#[test]
fn a_killed_worker_is_reported_and_reaped_and_others_keep_running() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&COUNTER_LOOP);
    let doomed = WorkerHandle::spawn(Path::new(WORKER_EXE), counter_config(payload.path())).unwrap();
    let survivor = WorkerHandle::spawn(Path::new(WORKER_EXE), counter_config(payload.path())).unwrap();
    doomed.start().unwrap();
    survivor.start().unwrap();
    let pid = doomed.pid();
    // SAFETY: sending SIGKILL to the worker process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    match doomed.wait_event(Duration::from_secs(5)) {
        Some(WorkerEvent::Died { pid: died, status }) => {
            assert_eq!(died, pid);
            assert!(status.contains("SIGKILL") || status.contains('9'), "status {status}");
        }
        other => panic!("expected Died, got {other:?}"),
    }
    let err = doomed.pause().unwrap_err();
    assert!(matches!(err, WorkerError::WorkerDied { .. }), "{err}");
    assert!(err.to_string().contains("died"), "{err}");
    assert!(!process_exists(pid), "worker {pid} was not reaped");
    assert_eq!(survivor.pause().unwrap(), RunState::Paused);
    assert_eq!(survivor.resume().unwrap(), RunState::Running);
    survivor.stop().unwrap();
}

#[test]
fn dropping_the_handle_kills_the_worker() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&COUNTER_LOOP);
    let worker = WorkerHandle::spawn(Path::new(WORKER_EXE), counter_config(payload.path())).unwrap();
    worker.start().unwrap();
    let pid = worker.pid();
    assert!(process_exists(pid));
    drop(worker);
    assert!(!process_exists(pid), "worker {pid} survived its handle");
}

#[test]
fn a_worker_exits_when_its_controller_goes_away() {
    if !kvm_usable() {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Play the controller by hand, then vanish the way a crashed controller does: its end of
    // the socket closes without a Stop.
    let payload = elf_payload(&COUNTER_LOOP);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs_fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(WORKER_EXE);
    command.args(["worker", "--control-fd", "3"]);
    // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(theirs_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = command.spawn().unwrap();
    drop(theirs);
    let mut writer = ours.try_clone().unwrap();
    let configure =
        capsule_vmm::worker::protocol::ToWorker::Configure { config: counter_config(payload.path()), control: None };
    writeln!(writer, "{}", serde_json::to_string(&configure).unwrap()).unwrap();
    let start = capsule_vmm::worker::protocol::ToWorker::Request { id: 1, op: capsule_vmm::worker::Op::Start };
    writeln!(writer, "{}", serde_json::to_string(&start).unwrap()).unwrap();
    let mut reader = BufReader::new(ours.try_clone().unwrap());
    let mut ready = String::new();
    reader.read_line(&mut ready).unwrap();
    assert!(ready.contains("Ready"), "{ready}");
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert!(reply.contains("Running"), "{reply}");
    drop((writer, reader, ours));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "worker ended with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "worker kept running without a controller");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_build_failure_comes_back_from_spawn_with_its_cause() {
    let mut config = VmConfig::new("/nonexistent/vmlinux", "");
    config.mem_mib = 64;
    let err = WorkerHandle::spawn(Path::new(WORKER_EXE), config).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WorkerError::BuildFailed(_)), "{text}");
    assert!(text.contains("kernel: /nonexistent/vmlinux"), "{text}");
}

/// Children of this process that are zombies running `comm`.
fn zombie_children(comm: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // pid (comm) state ppid ...
            let Some((head, tail)) = stat.rsplit_once(") ") else {
                return false;
            };
            let fields: Vec<&str> = tail.split_whitespace().collect();
            head.ends_with(&format!("({comm}")) && fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str())
        })
        .collect()
}

#[test]
fn a_spawn_that_fails_after_the_child_started_leaves_no_zombie() {
    // `true` ignores its arguments and exits at once, so writing a first message larger than
    // the socket buffer fails (EPIPE) after the child was started.
    let exe = Path::new("/bin/true");
    let mut config = VmConfig::new("/nonexistent/vmlinux", "x".repeat(8 << 20));
    config.mem_mib = 64;
    let err = WorkerHandle::spawn(exe, config).unwrap_err();
    // The child exists by now: this is the path that used to drop it unreaped.
    assert!(matches!(err, WorkerError::Write(_)), "{err}");
    let zombies = zombie_children("true");
    assert!(zombies.is_empty(), "unreaped workers: {zombies:?}");
}

#[test]
fn a_workers_log_lands_in_a_file_beside_its_serial_log() {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut config = VmConfig::new("/nonexistent/vmlinux", "");
    config.mem_mib = 64;
    config.serial_log = Some(serial.clone());
    let err = WorkerHandle::spawn(Path::new(WORKER_EXE), config).unwrap_err();
    assert!(matches!(err, WorkerError::BuildFailed(_)), "{err}");
    // The worker logs the failure before it reports it, so the line is there by now.
    let log_path = capsule_vmm::worker_log::worker_log_path(&serial);
    let log =
        std::fs::read_to_string(&log_path).unwrap_or_else(|e| panic!("no worker log at {}: {e}", log_path.display()));
    assert!(log.contains("could not build the VM") && log.contains("/nonexistent/vmlinux"), "worker log:\n{log}");
}

/// `mov ecx, 0x200000; spin: dec ecx; jnz spin; ud2` (no IDT: a triple fault after a while).
const SPIN_THEN_TRIPLE_FAULT: [u8; 11] = [0xb9, 0x00, 0x00, 0x20, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0x0f, 0x0b];

/// Kills a worker let go by its handle when the test ends, however it ends: an outliving worker
/// has no handle to do it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) with plain integers, on a worker this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

fn control_socket(dir: &Path) -> ControlSocket {
    ControlSocket { path: dir.join("control.sock"), ended: dir.join("vm-ended.json") }
}

#[test]
fn an_outliving_worker_runs_on_without_its_controller_and_takes_the_next_one() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&COUNTER_LOOP);
    let dir = tempfile::tempdir().unwrap();
    let control = control_socket(dir.path());
    let first = WorkerHandle::spawn_outliving(Path::new(WORKER_EXE), counter_config(payload.path()), &control).unwrap();
    first.start().unwrap();
    let pid = first.pid();
    let _cleanup = KillOnDrop(pid);
    // The controller goes (its end of the control connection closes).
    first.detach();
    std::thread::sleep(Duration::from_millis(300));
    assert!(process_exists(pid), "the worker ended with its controller");

    let second = WorkerHandle::attach(&control).expect("a new controller attaches");
    assert_eq!(second.pid(), pid);
    assert_eq!(second.status().unwrap(), RunState::Running, "the VM ran on meanwhile");
    // One controller at a time.
    match WorkerHandle::attach(&control) {
        Err(WorkerError::BuildFailed(error)) => assert!(error.to_string().contains("another controller"), "{error}"),
        other => panic!("a second controller was let in: {other:?}"),
    }
    assert_eq!(second.pause().unwrap(), RunState::Paused);
    assert_eq!(second.resume().unwrap(), RunState::Running);
    // Dropping an attached handle kills the worker, as dropping a spawned one does.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
    {
        assert!(Instant::now() < deadline, "worker {pid} survived its attached handle");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_vm_that_ends_with_no_controller_leaves_word_of_how() {
    if !kvm_usable() {
        return;
    }
    let payload = elf_payload(&SPIN_THEN_TRIPLE_FAULT);
    let dir = tempfile::tempdir().unwrap();
    let control = control_socket(dir.path());
    let worker =
        WorkerHandle::spawn_outliving(Path::new(WORKER_EXE), counter_config(payload.path()), &control).unwrap();
    worker.start().unwrap();
    let _cleanup = KillOnDrop(worker.pid());
    worker.detach();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !control.ended.exists() {
        assert!(Instant::now() < deadline, "no word of the VM's end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended: VmEnded = serde_json::from_slice(&std::fs::read(&control.ended).unwrap()).unwrap();
    assert_eq!(ended.event, VmEvent::TripleFault { vcpu: 0 });
    match WorkerHandle::attach(&control) {
        Err(WorkerError::NotListening { .. }) => {}
        other => panic!("a worker with no VM still listens: {other:?}"),
    }
}
