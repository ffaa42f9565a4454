//! Tool failures as the model reads them: what went wrong (the whole cause chain, once) and what
//! to do next, phrased in terms of the tools and their parameters.
//!
//! The manager and the guest state facts; the hints that name tools live here.

use capsule_agent::protocol::ErrorKind;
use capsule_vmm::worker::error_chain;
use rmcp::model::CallToolResult;

use super::shaping::error_result;
use crate::guest::GuestError;
use crate::sandbox::{LimitError, ManagerError};

/// A tool failure, rendered for the model.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The manager refused (unknown id, limits, wrong state, failed sandbox).
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// A parameter is invalid.
    #[error("invalid parameter: {0}")]
    BadParameter(String),
    /// The guest refused or failed the operation.
    #[error("{what} failed in sandbox {sandbox}: {}.{hint}", .cause.to_string().trim_end_matches('.'))]
    Guest {
        /// What was being done.
        what: String,
        /// The sandbox.
        sandbox: String,
        /// The failure (its text is part of the message).
        cause: GuestError,
        /// What to do next.
        hint: String,
    },
}

impl ToolError {
    /// The `isError` result the model reads.
    pub fn into_result(self) -> CallToolResult {
        error_result(self.message())
    }

    /// The message: the failure with its causes, then what to do next.
    pub fn message(&self) -> String {
        match self {
            ToolError::Manager(e) => format!("{}{}", error_chain(e), manager_hint(e)),
            other => other.to_string(),
        }
    }
}

/// What to do next about a manager error, naming the tools.
fn manager_hint(e: &ManagerError) -> String {
    match e {
        ManagerError::UnknownSandbox { .. } => {
            " Omit sandbox_id to use the default sandbox, or call list_sandboxes.".into()
        }
        ManagerError::NoDefault => "; run_code or run_command creates it".into(),
        ManagerError::RolledBack { .. } => {
            ". It is paused at that snapshot, and the next call resumes it there: check what it holds, then redo \
             what was lost."
                .into()
        }
        ManagerError::Failed { .. } => " restart_sandbox boots it again on its disk (its files are kept), or delete \
                                         it with kill_sandbox and create a new one (or omit sandbox_id to get a fresh \
                                         default sandbox)."
            .into(),
        ManagerError::Limit(LimitError::Count { retention_s, .. }) => format!(
            ". Delete ones you no longer need with kill_sandbox (list_sandboxes shows them). Sandboxes of ended \
             sessions (HTTP sessions do not survive a server restart) are paused when idle and deleted after the \
             retention period ({retention_s} s); a server started with --shared-sandboxes lists and can kill them \
             sooner."
        ),
        ManagerError::Limit(LimitError::Memory { .. }) => {
            ". Pause another sandbox with pause or delete one with kill_sandbox, or ask for less memory_mib.".into()
        }
        ManagerError::Limit(LimitError::Templates { max: 0, .. }) => {
            ". Start sandboxes from the built-in template, or fork this sandbox to copy its state.".into()
        }
        ManagerError::Limit(LimitError::Templates { .. } | LimitError::TemplateBytes { .. }) => {
            " (a human runs it on the server's host); list_templates shows the saved ones.".into()
        }
        ManagerError::Busy { operation, .. } => {
            format!("; wait for them to finish (or kill their processes), then {operation}")
        }
        ManagerError::ConnectionLost { .. } => ", so retry the call".into(),
        ManagerError::Unresponsive { .. } => ". Something in it may be starving its agent (a runaway process): call \
                                               restart_sandbox to boot it again (its files are kept; processes and \
                                               interpreter state are lost), or retry later if it may recover."
            .into(),
        ManagerError::Engine(_) => ". Try again; if it keeps failing, kill_sandbox it and create a new one.".into(),
        ManagerError::Registry(_) => {
            "; retry, and if it persists check the server's state directory (disk full or read-only?)".into()
        }
        ManagerError::ShuttingDown => "; retry once it is back".into(),
        ManagerError::Network(_) => {
            ". Ask for that or less in create_sandbox's network (or omit network to get the server's policy).".into()
        }
        ManagerError::NetworkChannel(_) => "; retry, or restart_sandbox if it persists".into(),
        ManagerError::BadParameter(_) | ManagerError::WrongState { .. } | ManagerError::Illegal { .. } => String::new(),
    }
}

/// What to do next about a guest failure of `kind`.
pub fn hint_for(kind: Option<ErrorKind>) -> &'static str {
    match kind {
        Some(ErrorKind::NotFound) => " Check the path or id: list_files shows files, read_process needs a pid from run_command with background=true.",
        Some(ErrorKind::NotADirectory) => " A component of the path is a file, not a directory.",
        Some(ErrorKind::IsADirectory) => " The path is a directory: use list_files for it.",
        Some(ErrorKind::PermissionDenied) => " Pick a path you may write, e.g. under the work directory or /tmp.",
        Some(ErrorKind::TooLarge) => " Ask for less (smaller limit, or split the data).",
        Some(ErrorKind::InvalidArgument) => " Fix the parameter named above.",
        Some(ErrorKind::Timeout) => " It ran out of time; retry, or do less per call.",
        Some(ErrorKind::Unsupported) => " This sandbox's agent cannot do that.",
        Some(ErrorKind::AlreadyExists) => " Pick another name or path.",
        Some(ErrorKind::DirectoryNotEmpty) => " Remove its contents first.",
        Some(ErrorKind::Closed) => " The process exited or its input was closed: read_process shows how it ended.",
        Some(ErrorKind::Busy) => " Let it read what it was sent first (read_process shows its progress), then send more.",
        _ => " Retry; if it keeps failing, inspect the sandbox with run_command.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manager_error_reads_as_its_fact_then_what_to_do() {
        let e = ToolError::Manager(ManagerError::Busy { id: "sb-1".into(), calls: 2, operation: "fork" });
        assert_eq!(
            e.message(),
            "sandbox sb-1 is busy: 2 call(s) are running in it; wait for them to finish (or kill their processes), \
             then fork"
        );
        let e = ToolError::Manager(ManagerError::Limit(LimitError::Memory {
            used_mib: 1024,
            budget_mib: 2048,
            needed_mib: 2048,
        }));
        assert!(e.message().starts_with("limit reached: running sandboxes use 1024 MiB"), "{}", e.message());
        assert!(e.message().ends_with("or ask for less memory_mib."), "{}", e.message());
    }
}
