//! The 8250/16550 serial console on COM1 (vm-superio's model), its interrupt as an irqfd
//! [`EventFd`], and [`SerialLog`]: a bounded sink for what the guest prints. The log keeps a
//! file capped at [`MAX_SERIAL_LOG_BYTES`] (then one truncation marker) and an in-memory tail,
//! and notices kernel panics. It never blocks the guest on the reader.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::persist::Persist;

/// Most bytes written to the serial log file; later output is dropped after one marker line.
pub const MAX_SERIAL_LOG_BYTES: u64 = 8 << 20;
/// Bytes of recent output kept in memory.
pub const SERIAL_TAIL_BYTES: usize = 64 << 10;
/// What Linux prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic";
/// What Linux prints when a panic did not reboot (`panic=0`, or a panic before the `panic=`
/// parameter was parsed): the kernel now spins forever, so the VM is over.
const PANIC_END_MARKER: &[u8] = b"---[ end Kernel panic";
/// Ports covered by one 8250.
pub const SERIAL_PORT_COUNT: u16 = 8;

/// Errors from creating the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("creating the serial log file {path}")]
    CreateLog {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("saved UART state is not valid: {0}")]
    BadState(String),
}

#[derive(Debug, Default)]
struct LogState {
    file: Option<File>,
    file_bytes: u64,
    truncated: bool,
    tail: Vec<u8>,
    total_bytes: u64,
    panic_seen: bool,
    panic_ended: bool,
    first_output: Option<Instant>,
}

/// Bounded record of the guest's serial output.
#[derive(Debug, Default)]
pub struct SerialLog {
    state: Mutex<LogState>,
    /// Mirror of `LogState::panic_ended`, read by the vCPU loop after every port write.
    panic_ended: AtomicBool,
    grew: Condvar,
}

impl SerialLog {
    /// A log kept only in memory.
    pub fn in_memory() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A log that also writes (bounded) to `path`, created or truncated.
    pub fn to_file(path: &Path) -> Result<Arc<Self>, SerialError> {
        let file = File::create(path).map_err(|source| SerialError::CreateLog { path: path.to_path_buf(), source })?;
        let log = Self::default();
        log.lock().file = Some(file);
        Ok(Arc::new(log))
    }

    /// A log that appends to `path` (created if missing), counting what is already there
    /// against the file cap: a restored VM's console continues the saved VM's log.
    pub fn append_to_file(path: &Path) -> Result<Arc<Self>, SerialError> {
        let err = |source| SerialError::CreateLog { path: path.to_path_buf(), source };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        let existing = file.metadata().map_err(err)?.len();
        let log = Self::default();
        {
            let mut state = log.lock();
            state.file = Some(file);
            state.file_bytes = existing;
            state.truncated = existing >= MAX_SERIAL_LOG_BYTES;
        }
        Ok(Arc::new(log))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output.
    pub fn append(&self, bytes: &[u8]) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.first_output.get_or_insert_with(Instant::now);
        s.total_bytes += bytes.len() as u64;
        if let Some(file) = s.file.as_mut() {
            let room = MAX_SERIAL_LOG_BYTES.saturating_sub(s.file_bytes);
            let take = (bytes.len() as u64).min(room) as usize;
            // Write failures (disk full) must not stop the guest; the tail still has it.
            let _ = file.write_all(&bytes[..take]);
            let mut written = take as u64;
            if take < bytes.len() && !s.truncated {
                let marker = format!("\n[capsule: serial log truncated at {MAX_SERIAL_LOG_BYTES} bytes]\n");
                if let Some(file) = s.file.as_mut() {
                    let _ = file.write_all(marker.as_bytes());
                }
                written += marker.len() as u64;
                s.truncated = true;
            }
            s.file_bytes += written;
        }
        s.tail.extend_from_slice(bytes);
        if !s.panic_seen && ends_with_new(&s.tail, bytes.len(), PANIC_MARKER) {
            s.panic_seen = true;
        }
        if !s.panic_ended && ends_with_new(&s.tail, bytes.len(), PANIC_END_MARKER) {
            s.panic_ended = true;
            s.panic_seen = true;
            self.panic_ended.store(true, Ordering::Release);
        }
        if s.tail.len() > SERIAL_TAIL_BYTES {
            let excess = s.tail.len() - SERIAL_TAIL_BYTES;
            s.tail.drain(..excess);
        }
        drop(guard);
        self.grew.notify_all();
    }

    /// The most recent output (at most [`SERIAL_TAIL_BYTES`]).
    pub fn tail(&self) -> Vec<u8> {
        self.lock().tail.clone()
    }

    /// Whether the guest printed "Kernel panic".
    pub fn panic_seen(&self) -> bool {
        self.lock().panic_seen
    }

    /// Whether the guest printed the end of a panic that did not reboot: it will never run
    /// again, and the vCPU loop reports [`crate::VmEvent::Panic`].
    pub fn panic_ended(&self) -> bool {
        self.panic_ended.load(Ordering::Acquire)
    }

    /// Bytes the guest has printed so far, dropped ones included.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// When the first byte arrived.
    pub fn first_output(&self) -> Option<Instant> {
        self.lock().first_output
    }

    /// Waits until the tail contains `needle`; returns false on timeout.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if contains(&s.tail, needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.grew.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Whether `needle` occurs in `tail` in a window that overlaps its last `new_bytes` bytes.
fn ends_with_new(tail: &[u8], new_bytes: usize, needle: &[u8]) -> bool {
    let window_start = tail.len().saturating_sub(new_bytes + needle.len());
    contains(&tail[window_start..], needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `std::io::Write` into a [`SerialLog`], for vm-superio.
#[derive(Debug, Clone)]
pub struct SerialLogWriter(pub Arc<SerialLog>);

impl Write for SerialLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the serial IRQ by signalling an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, SerialLogWriter>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART in its power-on state writing into `log`.
    pub fn new(log: Arc<SerialLog>) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(Self { serial: Serial::new(IrqTrigger(evt), SerialLogWriter(log)) })
    }

    /// The interrupt eventfd, to register as the irqfd of the UART's IRQ.
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }
}

/// The UART registers a snapshot keeps (vm-superio's `SerialState`, in serde form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    /// Where the restored UART writes.
    type ConstructorArgs = Arc<SerialLog>;
    type Error = SerialError;

    /// The registers and receive FIFO.
    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved `state`, writing into `log` (a pending THR/RDA interrupt is raised
    /// again once its eventfd is registered).
    fn restore(log: Arc<SerialLog>, state: &SerialDeviceState) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let saved = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&saved, IrqTrigger(evt), NoEvents, SerialLogWriter(log))
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(Self { serial })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An interrupt that cannot be raised is not the guest's fault; output is kept.
            let _ = self.serial.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line control and divisor-latch access: what a driver sets up before printing.
    const LCR: u64 = 3;
    const IER: u64 = 1;
    const SCRATCH: u64 = 7;

    #[test]
    fn a_uart_round_trips_and_keeps_printing() {
        let log = SerialLog::in_memory();
        let mut uart = SerialDevice::new(log.clone()).unwrap();
        uart.write(LCR, &[0x03]); // 8N1
        uart.write(IER, &[0x02]); // THR-empty interrupt
        uart.write(SCRATCH, &[0x5a]);
        uart.write(0, b"a");
        let restored_log = SerialLog::in_memory();
        let mut restored = crate::persist::test_util::round_trip(&uart, restored_log.clone());
        let mut scratch = [0u8];
        restored.read(SCRATCH, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        restored.write(0, b"b");
        assert_eq!(log.tail(), b"a");
        assert_eq!(restored_log.tail(), b"b", "the restored UART prints into its new log");
    }

    #[test]
    fn file_is_capped_with_one_marker_and_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let log = SerialLog::to_file(&path).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            log.append(&chunk);
        }
        let written = std::fs::read(&path).unwrap();
        let marker = format!("\n[capsule: serial log truncated at {MAX_SERIAL_LOG_BYTES} bytes]\n");
        assert_eq!(written.len() as u64, MAX_SERIAL_LOG_BYTES + marker.len() as u64);
        assert!(written.ends_with(marker.as_bytes()));
        assert_eq!(log.tail().len(), SERIAL_TAIL_BYTES);
        assert_eq!(log.total_bytes(), 10 << 20);
    }

    #[test]
    fn a_restored_console_appends_to_the_saved_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        SerialLog::to_file(&path).unwrap().append(b"before ");
        SerialLog::append_to_file(&path).unwrap().append(b"after");
        assert_eq!(std::fs::read(&path).unwrap(), b"before after");
        let fresh = dir.path().join("fork.log");
        SerialLog::append_to_file(&fresh).unwrap().append(b"fork");
        assert_eq!(std::fs::read(&fresh).unwrap(), b"fork");
    }

    #[test]
    fn panic_is_noticed_across_writes() {
        let log = SerialLog::in_memory();
        for b in b"[ 1.0] Kernel pa".iter() {
            log.append(&[*b]);
        }
        assert!(!log.panic_seen());
        log.append(b"nic - not syncing");
        assert!(log.panic_seen());
        assert!(log.wait_for(b"not syncing", Duration::from_millis(1)));
        assert!(!log.wait_for(b"absent", Duration::from_millis(1)));
        assert!(!log.panic_ended(), "a panic that may still reboot is not the end");
    }

    #[test]
    fn the_end_of_a_panic_that_did_not_reboot_is_noticed_byte_by_byte() {
        let log = SerialLog::in_memory();
        log.append(b"[ 0.27] Kernel panic - not syncing: Attempted to kill the idle task!\n");
        assert!(!log.panic_ended());
        for b in b"[ 0.28] ---[ end Kernel panic - not syncing: Attempted".iter() {
            log.append(&[*b]);
        }
        assert!(log.panic_ended());
        assert!(log.panic_seen());
        let other = SerialLog::in_memory();
        other.append(b"---[ end trace 0000000000000000 ]---\n");
        assert!(!other.panic_ended(), "an oops trace alone is not a dead guest");
    }
}
