//! The sandbox state machine: which transitions are legal.
//!
//! ```text
//! creating → running ⇄ paused → deleted
//!     │         ⇅ unresponsive (its agent stopped answering; → running again when it answers
//!     │                          or is restarted, paused, or deleted)
//!     └──────→ failed ←──┘  (any live state can fail; failed → deleted, or running by a restart)
//! ```
//! The manager asks [`check`] before every transition; an illegal one is a
//! bug or a race and is refused, never applied.

use super::SandboxState;

/// An illegal transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a sandbox cannot go from {} to {}", from.as_str(), to.as_str())]
pub struct IllegalTransition {
    /// Current state.
    pub from: SandboxState,
    /// Requested state.
    pub to: SandboxState,
}

/// Checks that `from → to` is legal.
pub fn check(from: SandboxState, to: SandboxState) -> Result<(), IllegalTransition> {
    use SandboxState::*;
    let legal = matches!(
        (from, to),
        (Creating, Running)
            | (Creating, Failed)
            | (Creating, Deleted)
            | (Running, Paused)
            | (Running, Deleted)
            | (Running, Failed)
            | (Paused, Running)
            | (Paused, Deleted)
            | (Paused, Failed)
            | (Running, Unresponsive)
            | (Unresponsive, Running)
            | (Unresponsive, Paused)
            | (Unresponsive, Deleted)
            | (Unresponsive, Failed)
            | (Failed, Deleted)
            | (Failed, Running)
    );
    if legal {
        Ok(())
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn deleted_is_final_and_failed_only_deletes_or_restarts() {
        for to in [Creating, Running, Paused, Failed, Deleted, Unresponsive] {
            assert!(check(Deleted, to).is_err(), "deleted → {to:?}");
        }
        for to in [Creating, Paused, Failed, Unresponsive] {
            assert!(check(Failed, to).is_err(), "failed → {to:?}");
        }
        assert!(check(Failed, Deleted).is_ok());
        assert!(check(Failed, Running).is_ok(), "restart_sandbox boots a failed sandbox again");
    }

    #[test]
    fn pause_and_resume_go_both_ways_but_not_from_creating() {
        assert!(check(Running, Paused).is_ok());
        assert!(check(Paused, Running).is_ok());
        assert!(check(Creating, Paused).is_err());
        assert!(check(Paused, Paused).is_err());
    }
}

#[cfg(test)]
mod unresponsive_tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn an_unresponsive_sandbox_can_come_back_pause_or_go_but_not_be_created_again() {
        assert!(check(Running, Unresponsive).is_ok());
        for to in [Running, Paused, Deleted, Failed] {
            assert!(check(Unresponsive, to).is_ok(), "unresponsive → {to:?}");
        }
        assert!(check(Unresponsive, Creating).is_err());
        assert!(check(Paused, Unresponsive).is_err(), "a paused VM runs nothing to stop answering");
    }
}
