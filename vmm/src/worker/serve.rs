//! The worker side: build the VM, confine the process, and obey the control protocol until told
//! to stop.
//!
//! A worker started with a [`ControlSocket`] outlives its controller: when the control
//! connection closes, the VM runs on and the worker waits for the next controller on that
//! socket (one at a time; a second is refused). Events that happen meanwhile are kept for it; a
//! VM that ends with no controller attached is recorded in the socket's `ended` file, and the
//! worker exits. A worker without one exits when its control connection closes.

use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{channel, Sender};

use super::protocol::{
    read_message, write_message, ControlSocket, FromWorker, Op, RemoteError, RemoteErrorKind, ToWorker, VmEnded,
};
use super::{error_chain, WorkerError, CONTROL_FD_FLAG, WORKER_SUBCOMMAND};
use crate::builder::{build_microvm, build_microvm_from_snapshot, BuildError};
use crate::devices::virtio::block::undo::{snapshot_tag, BOOT_TAG};
use crate::microvm::MicroVm;
use crate::snapshot::{save_snapshot, SnapshotError, SnapshotInfo, SnapshotRef};
use crate::vstate::vcpu::{RunState, VmEvent};

/// What the worker's main loop hears. Controllers are numbered, so that a stale one's requests
/// and its end are told apart from the current one's.
enum Input {
    Request { controller: u64, id: u64, op: Op },
    Event(VmEvent),
    ControllerGone { controller: u64 },
    Controller(UnixStream),
}

/// The control fd named by a worker command line (`worker --control-fd N`, program name
/// excluded), or `None` when the arguments are not a worker invocation.
pub fn control_fd_from_args(args: &[String]) -> Option<RawFd> {
    match args {
        [sub, flag, fd] if sub == WORKER_SUBCOMMAND && flag == CONTROL_FD_FLAG => fd.parse().ok(),
        _ => None,
    }
}

/// The `main` of a stand-alone worker binary (tests and benches spawn these, as production
/// spawns `capsule worker`): logs, runs the worker on the control fd from the command line,
/// and exits 2 on a bad command line or 1 when the worker fails.
pub fn worker_main(program: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(fd) = control_fd_from_args(&args) else {
        eprintln!("usage: {program} {WORKER_SUBCOMMAND} {CONTROL_FD_FLAG} <fd>");
        std::process::exit(2);
    };
    crate::worker_log::init();
    match run_worker(fd) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{program}: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// The kind of a build failure.
fn build_error_kind(e: &BuildError) -> RemoteErrorKind {
    match e {
        BuildError::Config(_) => RemoteErrorKind::InvalidInput,
        BuildError::Snapshot(s) => snapshot_error_kind(s),
        _ => RemoteErrorKind::HostFault,
    }
}

/// The kind of a snapshot failure.
fn snapshot_error_kind(e: &SnapshotError) -> RemoteErrorKind {
    use SnapshotError as E;
    match e {
        E::Exists(_) | E::NoParent | E::ChainTooDeep { .. } => RemoteErrorKind::WrongState,
        E::Format { .. }
        | E::ParentChanged { .. }
        | E::Mismatch { .. }
        | E::MemorySize { .. }
        | E::HostKind { .. }
        | E::DiskCount { .. } => RemoteErrorKind::InvalidInput,
        // A snapshot file that is missing or cut short is a snapshot that is not whole.
        E::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            RemoteErrorKind::InvalidInput
        }
        _ => RemoteErrorKind::HostFault,
    }
}

/// Binds an outliving worker's control socket (mode 0600; a stale file is replaced).
fn bind_control(control: &ControlSocket) -> Result<UnixListener, RemoteError> {
    let _ = std::fs::remove_file(&control.path);
    let _ = std::fs::remove_file(&control.ended);
    let listener = UnixListener::bind(&control.path).map_err(|e| {
        RemoteError::message(RemoteErrorKind::HostFault, format!("cannot listen on {}: {e}", control.path.display()))
    })?;
    std::fs::set_permissions(&control.path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        RemoteError::message(RemoteErrorKind::HostFault, format!("cannot restrict {}: {e}", control.path.display()))
    })?;
    Ok(listener)
}

/// Starts the thread that reads one controller's requests from `reader` (which may already hold
/// some of them).
fn read_controller(controller: u64, mut reader: BufReader<UnixStream>, tx: Sender<Input>) -> Result<(), WorkerError> {
    std::thread::Builder::new()
        .name(format!("control-reader-{controller}"))
        .spawn(move || loop {
            match read_message::<ToWorker>(&mut reader) {
                Ok(Some(ToWorker::Request { id, op })) => {
                    if tx.send(Input::Request { controller, id, op }).is_err() {
                        break;
                    }
                }
                Ok(Some(ToWorker::Configure { .. } | ToWorker::Restore { .. })) | Err(_) | Ok(None) => {
                    let _ = tx.send(Input::ControllerGone { controller });
                    break;
                }
            }
        })
        .map(drop)
        .map_err(WorkerError::Read)
}

/// Runs the worker on the control socket at `fd` until told to stop, or until the controller
/// goes (unless the worker outlives controllers; see the module docs).
pub fn run_worker(fd: RawFd) -> Result<(), WorkerError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(WorkerError::BadControlFd(fd));
    }
    // SAFETY: the controller handed us `fd` as our control socket; nothing else owns it.
    let socket = unsafe { UnixStream::from_raw_fd(fd) };
    // Keep the socket from leaking into anything this process might start.
    // SAFETY: setting FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut reader = BufReader::new(socket.try_clone().map_err(WorkerError::Read)?);
    let mut writer = socket;

    let (built, control) = match read_message::<ToWorker>(&mut reader)? {
        Some(ToWorker::Configure { config, control }) => (
            build_microvm(&config)
                .map(|vm| (vm, None))
                .map_err(|e| RemoteError::new(build_error_kind(&e), &e))
                .and_then(|built| begin_disk_epoch(built, BOOT_TAG)),
            control,
        ),
        Some(ToWorker::Restore { dir, overrides, control }) => (
            build_microvm_from_snapshot(&dir, &overrides)
                .map(|(vm, parent)| (vm, Some(parent)))
                .map_err(|e| RemoteError::new(build_error_kind(&e), &e))
                .and_then(|built| begin_disk_epoch(built, &snapshot_tag(&dir))),
            control,
        ),
        Some(other) => return Err(WorkerError::Protocol(format!("expected Configure or Restore, got {other:?}"))),
        None => return Ok(()),
    };
    let listener = match &control {
        Some(control) => bind_control(control).map(Some),
        None => Ok(None),
    };
    let built = built.and_then(|vm| listener.map(|listener| (vm, listener))).and_then(|(vm, listener)| {
        crate::confinement::confine_worker()
            .map(|()| (vm, listener))
            .map_err(|e| RemoteError::new(RemoteErrorKind::HostFault, &e))
    });
    let ((mut vm, mut last_snapshot), listener) = match built {
        Ok(built) => built,
        Err(error) => {
            tracing::error!(%error, "worker: could not build the VM");
            write_message(&mut writer, &FromWorker::Failed { error: error.clone() })?;
            return Err(WorkerError::BuildFailed(error));
        }
    };
    write_message(&mut writer, &FromWorker::Ready { pid: std::process::id() })?;

    let (tx, rx) = channel::<Input>();
    if let Some(events) = vm.take_events() {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || {
                for event in events {
                    if tx.send(Input::Event(event)).is_err() {
                        break;
                    }
                }
            })
            .map_err(WorkerError::Read)?;
    }
    if let Some(listener) = listener {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("control-listener".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if tx.send(Input::Controller(stream)).is_err() {
                        break;
                    }
                }
            })
            .map_err(WorkerError::Read)?;
    }
    let mut current = 0u64;
    read_controller(current, reader, tx.clone())?;
    let mut writer = Some(writer);
    // How the VM ended, once a controller has heard it.
    let mut ended: Option<VmEvent> = None;

    for input in rx {
        match input {
            Input::Request { controller, id, op } if controller == current => {
                let stopping = op == Op::Stop;
                let (result, snapshot) = apply(&mut vm, &mut last_snapshot, op);
                let ok = result.is_ok();
                let reply = FromWorker::Reply { id, result, snapshot };
                let sent = writer.as_mut().is_some_and(|w| write_message(w, &reply).is_ok());
                if stopping && ok {
                    break;
                }
                if !sent && control.is_none() {
                    break;
                }
            }
            Input::Request { .. } | Input::ControllerGone { .. } if control.is_none() => break,
            // A request or end of a controller that was replaced.
            Input::Request { .. } => {}
            Input::ControllerGone { controller } if controller == current => {
                if let (Some(event), Some(control)) = (&ended, &control) {
                    // Nobody will stop it: leave word and go.
                    record_end(control, event);
                    break;
                }
                tracing::info!("worker: the controller went away; the VM runs on, waiting for the next one");
                writer = None;
            }
            Input::ControllerGone { .. } => {}
            Input::Event(event) => {
                let heard =
                    writer.as_mut().is_some_and(|w| write_message(w, &FromWorker::Event(event.clone())).is_ok());
                if heard {
                    ended = Some(event);
                    continue;
                }
                // No controller heard it: an outliving worker leaves word for the next one.
                if let Some(control) = &control {
                    record_end(control, &event);
                }
                break;
            }
            Input::Controller(mut stream) => {
                if writer.is_some() {
                    let busy = RemoteError::message(RemoteErrorKind::WrongState, "another controller is attached");
                    let _ = write_message(&mut stream, &FromWorker::Failed { error: busy });
                    continue;
                }
                if write_message(&mut stream, &FromWorker::Ready { pid: std::process::id() }).is_err() {
                    continue;
                }
                current += 1;
                read_controller(current, BufReader::new(stream.try_clone().map_err(WorkerError::Read)?), tx.clone())?;
                tracing::info!("worker: a new controller attached");
                writer = Some(stream);
            }
        }
    }
    vm.stop();
    Ok(())
}

/// Leaves word of how the VM ended for the next controller.
fn record_end(control: &ControlSocket, event: &VmEvent) {
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let ended = VmEnded { event: event.clone(), at_unix_ms };
    if let Ok(text) = serde_json::to_vec(&ended) {
        if let Err(e) = std::fs::write(&control.ended, text) {
            tracing::error!(error = %e, "worker: cannot record how the VM ended");
        }
    }
    let _ = std::fs::remove_file(&control.path);
}

/// Starts the first undo epoch of a VM just built (from a boot or a restore).
fn begin_disk_epoch<P>(built: (MicroVm, P), tag: &str) -> Result<(MicroVm, P), RemoteError> {
    built.0.begin_disk_epoch(tag).map_err(|e| RemoteError::new(RemoteErrorKind::HostFault, &e))?;
    Ok(built)
}

fn apply(
    vm: &mut MicroVm,
    last_snapshot: &mut Option<SnapshotRef>,
    op: Op,
) -> (Result<RunState, RemoteError>, Option<SnapshotInfo>) {
    if let Op::Snapshot { dir, incremental } = op {
        let parent = if incremental {
            match last_snapshot.as_ref() {
                Some(parent) => Some(parent.clone()),
                None => return (Err(RemoteError::new(RemoteErrorKind::WrongState, &SnapshotError::NoParent)), None),
            }
        } else {
            None
        };
        return match save_snapshot(vm, &dir, parent.as_ref()) {
            Ok((info, snapshot)) => {
                *last_snapshot = Some(snapshot);
                // The disks are at the snapshot's moment (the devices are still parked).
                if let Err(e) = vm.begin_disk_epoch(&snapshot_tag(&dir)) {
                    // Writes the undo log cannot take back must not happen: the VM stops here,
                    // with its disks at the snapshot just written.
                    tracing::error!(error = %e, "worker: no new undo epoch after the snapshot; stopping the VM");
                    vm.stop();
                    return (Err(RemoteError::new(RemoteErrorKind::HostFault, &e)), None);
                }
                (Ok(vm.state()), Some(info))
            }
            Err(e) => {
                // Past the checks, the dirty log may be half consumed: the next snapshot must
                // be a full one.
                use crate::snapshot::SnapshotError as E;
                if !matches!(e, E::Exists(_) | E::NoParent | E::ChainTooDeep { .. } | E::Save(_)) {
                    *last_snapshot = None;
                }
                (Err(RemoteError::new(snapshot_error_kind(&e), &e)), None)
            }
        };
    }
    let done = match op {
        Op::Start => vm.start(),
        Op::Pause => vm.pause(),
        Op::Resume => vm.resume(),
        Op::Stop => {
            vm.stop();
            Ok(())
        }
        Op::Status | Op::Snapshot { .. } => Ok(()),
    };
    (done.map(|()| vm.state()).map_err(|e| RemoteError::new(RemoteErrorKind::WrongState, &e)), None)
}
