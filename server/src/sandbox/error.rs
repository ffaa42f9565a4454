//! The manager's errors: what went wrong, with its cause. They state facts; the front end that
//! reports them phrases what a client should do next.

use super::admission::LimitError;
use super::lifecycle::IllegalTransition;
use crate::engine::EngineError;
use crate::registry::RegistryError;

/// Errors of the manager: what went wrong, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such sandbox for this owner.
    #[error("no sandbox {id:?} in this session. {listing}")]
    UnknownSandbox {
        /// The id asked for.
        id: String,
        /// The owner's sandboxes, as a sentence.
        listing: String,
    },
    /// The owner has no default sandbox, and the call does not make one.
    #[error("this session has no default sandbox yet")]
    NoDefault,
    /// The sandbox failed; its state is lost.
    #[error("sandbox {id} has failed: {reason}. Its in-memory state is lost.")]
    Failed {
        /// The sandbox.
        id: String,
        /// Why.
        reason: String,
    },
    /// The sandbox's VM was lost, and the sandbox was rolled back to its newest snapshot.
    #[error("sandbox {id}: {note}")]
    RolledBack {
        /// The sandbox.
        id: String,
        /// What happened and what was lost.
        note: String,
    },
    /// A limit was reached.
    #[error("limit reached: {0}")]
    Limit(LimitError),
    /// The network asked for is more than the server's policy allows (the message says what it
    /// allows).
    #[error(transparent)]
    Network(#[from] crate::network::PolicyError),
    /// A sandbox's network channel could not be served.
    #[error("the network of the sandbox could not be set up")]
    NetworkChannel(#[source] crate::network::NetBrokerError),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    BadParameter(String),
    /// The sandbox is in the wrong state for the operation.
    #[error("sandbox {id} is {state}: {what}")]
    WrongState {
        /// The sandbox.
        id: String,
        /// Its state.
        state: &'static str,
        /// What cannot be done.
        what: String,
    },
    /// Calls are running in the sandbox, and the operation would cut them off.
    #[error("sandbox {id} is busy: {calls} call(s) are running in it")]
    Busy {
        /// The sandbox.
        id: String,
        /// How many.
        calls: usize,
        /// What was refused.
        operation: &'static str,
    },
    /// A call lost its connection to a sandbox that is still alive.
    #[error("the connection to sandbox {id} broke ({detail}); the sandbox is still running")]
    ConnectionLost {
        /// The sandbox.
        id: String,
        /// What broke.
        detail: String,
    },
    /// The sandbox's VM runs but its agent does not answer.
    #[error("sandbox {id} is unresponsive: {detail}")]
    Unresponsive {
        /// The sandbox.
        id: String,
        /// How it stopped answering.
        detail: String,
    },
    /// The engine failed.
    #[error("the sandbox engine failed")]
    Engine(#[source] EngineError),
    /// The registry failed.
    #[error("the sandbox registry failed, so the operation was not applied")]
    Registry(#[source] RegistryError),
    /// The operation's task could not finish (the server is shutting down).
    #[error("the server is shutting down, so the operation did not finish")]
    ShuttingDown,
    /// A transition that the state machine forbids (a race, or a bug).
    #[error("sandbox {id}")]
    Illegal {
        /// The sandbox.
        id: String,
        /// The transition.
        #[source]
        source: IllegalTransition,
    },
}

impl From<RegistryError> for ManagerError {
    fn from(e: RegistryError) -> Self {
        ManagerError::Registry(e)
    }
}

impl From<LimitError> for ManagerError {
    fn from(e: LimitError) -> Self {
        ManagerError::Limit(e)
    }
}
