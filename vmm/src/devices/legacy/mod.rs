//! Legacy PC devices: the 8250 serial console and the i8042/0xcf9 reset sources.

pub mod i8042;
pub mod serial;
