//! capsule-agent: the guest agent and the host↔guest protocol it speaks.
//!
//! - [`protocol`]: every message on the wire (plain data).
//! - [`cancel`]: cancellation and deadlines of one request.
//! - [`frame`]: length-prefixed framing with a hard size cap.
//! - [`client`]: the host side: a thread-safe client for one connection.
//! - [`server`]: the agent side: connections, handshake, dispatch;
//!   [`workers`]: the pool of request threads.
//! - [`process`], [`output`], [`files`], [`system`], [`context`]: what requests do;
//!   [`spawn`] starts their processes, [`pty`] gives them terminals.
//! - [`cgroup`]: containment of every command and context; [`budget`]: what
//!   the agent keeps for itself so it always answers.
//! - [`oserror`]: one mapping from OS errors to protocol error kinds.
//! - `lock`: the one poison-ignoring mutex lock.
//! - [`init`], [`vsock`]: PID 1 duties and the guest listener.

pub mod budget;
pub mod cancel;
pub mod cgroup;
pub mod client;
pub mod context;
pub mod files;
pub mod frame;
pub mod init;
mod lock;
pub mod oserror;
pub mod output;
pub mod process;
pub mod protocol;
pub mod pty;
pub mod server;
pub mod spawn;
pub mod system;
pub mod vsock;
pub mod workers;
