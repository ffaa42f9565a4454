//! The per-VM device-event thread: one epoll loop that waits on every
//! device's host-side event fd (e.g. vsock's Unix sockets) and lets the
//! device move data into its queues.
//!
//! It can be paused (for a VM pause or snapshot): once [`DeviceEventLoop::pause`]
//! returns, the thread is parked and touches neither devices nor guest memory
//! until [`DeviceEventLoop::resume`].
//!
//! It owns only the thread and its epoll; it never reads guest memory itself
//! and never holds a device lock while waiting.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{lock_device, DeviceMemory, SharedDevice};

/// Most events taken from epoll per wait.
const MAX_EVENTS_PER_WAIT: usize = 32;
/// Epoll token of the stop event.
const STOP_TOKEN: u64 = u64::MAX;
/// Epoll token of the pause/resume wake-up.
const WAKE_TOKEN: u64 = u64::MAX - 1;

/// Pause handshake between the owner and the thread.
#[derive(Debug, Default)]
struct PauseState {
    want_paused: bool,
    parked: bool,
}

#[derive(Debug, Default)]
struct PauseSwitch {
    state: Mutex<PauseState>,
    changed: Condvar,
}

impl PauseSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the thread: parks while a pause is wanted.
    fn park_if_wanted(&self) {
        let mut s = self.lock();
        if s.want_paused {
            s.parked = true;
            self.changed.notify_all();
            while s.want_paused {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked = false;
            self.changed.notify_all();
        }
    }
}

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
    wake: EventFd,
    switch: Arc<PauseSwitch>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceEventLoop {
    /// Starts the thread for `devices`; devices without an event fd are skipped.
    pub fn start<M: DeviceMemory>(devices: Vec<SharedDevice<M>>) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Create)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        epoll
            .ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))
            .map_err(|source| EventLoopError::Watch { fd: stop.as_raw_fd(), source })?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        epoll
            .ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))
            .map_err(|source| EventLoopError::Watch { fd: wake.as_raw_fd(), source })?;
        let switch = Arc::new(PauseSwitch::default());
        let thread_switch = switch.clone();
        let thread_wake = wake.try_clone().map_err(EventLoopError::Create)?;
        let mut watched = Vec::new();
        for device in devices {
            let fd = lock_device(&device).event_fd();
            if let Some(fd) = fd {
                epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, watched.len() as u64))
                    .map_err(|source| EventLoopError::Watch { fd, source })?;
                watched.push(device);
            }
        }
        let thread = std::thread::Builder::new()
            .name("virtio-events".into())
            .spawn(move || run(epoll, watched, thread_wake, thread_switch))
            .map_err(EventLoopError::Spawn)?;
        Ok(Self { stop, wake, switch, thread: Some(thread) })
    }

    /// Parks the thread; returns true once it is parked (false if it did not park within
    /// `timeout`, e.g. because it has exited).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.switch.lock().want_paused = true;
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "virtio: could not wake the device event loop to pause");
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.switch.lock();
        while !s.parked {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.switch.changed.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Lets a paused thread run again.
    pub fn resume(&self) {
        self.switch.lock().want_paused = false;
        self.switch.changed.notify_all();
    }
}

fn run<M: DeviceMemory>(epoll: Epoll, devices: Vec<SharedDevice<M>>, wake: EventFd, switch: Arc<PauseSwitch>) {
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
            if token == WAKE_TOKEN {
                // Drain the counter (nonblocking); the pause state says what to do.
                let _ = wake.read();
                switch.park_if_wanted();
                continue;
            }
            if let Some(device) = usize::try_from(token).ok().and_then(|i| devices.get(i)) {
                lock_device(device).process_events();
            }
        }
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        self.resume();
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::devices::virtio::device::{VirtioCommon, VirtioDevice};

    type Mem = vm_memory::GuestMemoryMmap<()>;

    /// A device whose host side is one eventfd; it counts how often the loop serves it.
    struct CountingDevice {
        evt: EventFd,
        served: Arc<AtomicUsize>,
        common: VirtioCommon<Mem>,
    }

    impl VirtioDevice<Mem> for CountingDevice {
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn queue_notify(&mut self, _: u32) {}
        fn common(&self) -> &VirtioCommon<Mem> {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon<Mem> {
            &mut self.common
        }
        fn event_fd(&self) -> Option<RawFd> {
            Some(self.evt.as_raw_fd())
        }
        fn process_events(&mut self) {
            let _ = self.evt.read();
            self.served.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_until(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_paused_loop_serves_no_device_until_resumed() {
        let served = Arc::new(AtomicUsize::new(0));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = evt.try_clone().unwrap();
        let device: SharedDevice<Mem> =
            Arc::new(Mutex::new(CountingDevice { evt, served: served.clone(), common: VirtioCommon::new(0, 0, &[]) }));
        let event_loop = DeviceEventLoop::start(vec![device]).unwrap();
        trigger.write(1).unwrap();
        assert!(wait_until(|| served.load(Ordering::SeqCst) == 1));

        assert!(event_loop.pause(Duration::from_secs(5)));
        trigger.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(served.load(Ordering::SeqCst), 1, "served while paused");

        event_loop.resume();
        assert!(wait_until(|| served.load(Ordering::SeqCst) == 2));
        // Dropping a paused loop still stops its thread.
        assert!(event_loop.pause(Duration::from_secs(5)));
        drop(event_loop);
    }
}
