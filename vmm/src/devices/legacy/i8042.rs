//! Reset sources: just enough of the i8042 keyboard controller (ports 0x60-0x64) to turn the
//! guest's "pulse reset line" command into a clean stop, plus the 0xcf9 reset-control register.
//! They only raise a [`StopRequest`]; stopping the VM is the vCPU loop's job.

use std::sync::{Arc, Mutex};

use crate::devices::bus::BusDevice;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 ports covered: 0x60..=0x64.
pub const I8042_PORT_COUNT: u16 = 5;
/// Offset of the command/status port (0x64) from 0x60.
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0" = CPU reset.
const CMD_RESET_CPU: u8 = 0xfe;
/// Reset-control register port.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// Bit 2 of 0xcf9: perform the reset.
const RESET_CONTROL_RESET_BIT: u8 = 1 << 2;

/// How a device asked for the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResetSource {
    /// `outb 0xfe, 0x64`.
    I8042,
    /// `outb 0x6/0xe, 0xcf9`.
    ResetControl,
}

/// A latch set by a device and taken by the vCPU that handled the access.
#[derive(Debug, Default)]
pub struct StopRequest(Mutex<Option<ResetSource>>);

impl StopRequest {
    /// Records a reset request (the first one wins).
    pub fn request(&self, source: ResetSource) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(source);
    }

    /// Takes a pending request.
    pub fn take(&self) -> Option<ResetSource> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The i8042 controller, reduced to its reset command.
#[derive(Debug)]
pub struct I8042 {
    stop: Arc<StopRequest>,
}

impl I8042 {
    /// A controller that raises `stop` on a reset command.
    pub fn new(stop: Arc<StopRequest>) -> Self {
        Self { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty. Data reads as 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.stop.request(ResetSource::I8042);
        }
    }
}

/// The 0xcf9 reset-control register.
#[derive(Debug)]
pub struct ResetControl {
    stop: Arc<StopRequest>,
    value: u8,
}

impl ResetControl {
    /// A register that raises `stop` when the reset bit is written.
    pub fn new(stop: Arc<StopRequest>) -> Self {
        Self { stop, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.value = v & !RESET_CONTROL_RESET_BIT;
            if v & RESET_CONTROL_RESET_BIT != 0 {
                self.stop.request(ResetSource::ResetControl);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_raises_a_stop() {
        let stop = Arc::new(StopRequest::default());
        let mut kbd = I8042::new(stop.clone());
        kbd.write(0, &[CMD_RESET_CPU]);
        kbd.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(stop.take(), None);
        kbd.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(stop.take(), Some(ResetSource::I8042));
        let mut rc = ResetControl::new(stop.clone());
        rc.write(0, &[0x2]);
        assert_eq!(stop.take(), None);
        rc.write(0, &[0x6]);
        assert_eq!(stop.take(), Some(ResetSource::ResetControl));
    }
}
