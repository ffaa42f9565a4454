//! The per-VM device-event thread: one epoll loop that waits on every
//! device's host-side event fd (e.g. vsock's Unix sockets) and lets the
//! device move data into its queues.
//!
//! It owns only the thread and its epoll; it never reads guest memory itself
//! and never holds a device lock while waiting.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{lock_device, DeviceMemory, SharedDevice};

/// Most events taken from epoll per wait.
const MAX_EVENTS_PER_WAIT: usize = 32;
/// Epoll token of the stop event.
const STOP_TOKEN: u64 = u64::MAX;

/// Why the device-event thread could not start.
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// Creating the epoll or the stop eventfd failed.
    #[error("creating the device event loop's epoll or eventfd failed")]
    Create(#[source] std::io::Error),
    /// Adding a device's event fd to epoll failed.
    #[error("watching device event fd {fd} failed")]
    Watch {
        /// The device's event fd.
        fd: RawFd,
        /// The epoll_ctl error.
        #[source]
        source: std::io::Error,
    },
    /// Spawning the thread failed.
    #[error("spawning the device event thread failed")]
    Spawn(#[source] std::io::Error),
}

/// The running device-event thread. Dropping it stops and joins the thread.
pub struct DeviceEventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl DeviceEventLoop {
    /// Starts the thread for `devices`; devices without an event fd are skipped.
    pub fn start<M: DeviceMemory>(devices: Vec<SharedDevice<M>>) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Create)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(|source| EventLoopError::Watch {
                fd: stop.as_raw_fd(),
                source,
            })?;
        let mut watched = Vec::new();
        for device in devices {
            let fd = lock_device(&device).event_fd();
            if let Some(fd) = fd {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, watched.len() as u64),
                    )
                    .map_err(|source| EventLoopError::Watch { fd, source })?;
                watched.push(device);
            }
        }
        let thread = std::thread::Builder::new()
            .name("virtio-events".into())
            .spawn(move || run(epoll, watched))
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn run<M: DeviceMemory>(epoll: Epoll, devices: Vec<SharedDevice<M>>) {
    let mut events = vec![EpollEvent::default(); MAX_EVENTS_PER_WAIT];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "virtio: device event loop epoll_wait failed, stopping");
                return;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            if token == STOP_TOKEN {
                return;
            }
            if let Some(device) = usize::try_from(token).ok().and_then(|i| devices.get(i)) {
                lock_device(device).process_events();
            }
        }
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!(error = %e, "virtio: could not signal the device event loop to stop");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("virtio: device event thread panicked");
            }
        }
    }
}
