//! capsule-agent: the guest agent and the host↔guest protocol it speaks.
//!
//! - [`protocol`]: every message on the wire (plain data).
//! - [`cancel`]: cancellation and deadlines of one request.
//! - [`frame`]: length-prefixed framing with a hard size cap.

pub mod cancel;
pub mod frame;
pub mod protocol;
