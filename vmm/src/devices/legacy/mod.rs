//! Legacy PC devices: the 8250 serial console and the i8042/0xcf9 reset sources, and
//! [`LegacyDevices`], the set a VM holds and saves as one [`LegacyDevicesState`]. It never
//! places devices on a bus (the builder does).

pub mod i8042;
pub mod serial;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::persist::Persist;
use i8042::{I8042State, ResetControl, ResetControlState, I8042};
use serial::{SerialDevice, SerialDeviceState};

/// The port-I/O devices of one VM, as it holds them for saving.
#[derive(Debug, Clone)]
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub reset_control: Arc<Mutex<ResetControl>>,
}

/// What a snapshot keeps of the port-I/O devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyDevicesState {
    pub serial: SerialDeviceState,
    pub i8042: I8042State,
    pub reset_control: ResetControlState,
}

impl LegacyDevices {
    /// Every device's state (the VM should be paused).
    pub fn save(&self) -> LegacyDevicesState {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        LegacyDevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            reset_control: lock(&self.reset_control).save(),
        }
    }
}
