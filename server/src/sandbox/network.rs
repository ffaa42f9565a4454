//! Sandboxes and the network broker: the policy a sandbox's record gives it under the server's
//! ceiling, and its worker's broker channel attached to the manager's [`NetworkBroker`].
//!
//! The engine that spawns a worker (create, resume, fork, restart) hands the daemon's end of
//! the worker's channel to [`Manager::attach_network`]; a deleted sandbox's channel is detached
//! by the manager itself. Nothing here decides what a sandbox reaches: that is
//! [`crate::network::Egress`]'s.

use std::os::fd::OwnedFd;

use super::manager::{Manager, ManagerError};
use crate::network::{EffectivePolicy, NetworkBroker};
use crate::record::SandboxRecord;

impl Manager {
    /// The broker that serves every sandbox's network channel.
    pub fn network_broker(&self) -> &NetworkBroker {
        &self.inner.network
    }

    /// The network policy of the sandbox `record` under the server's ceiling now.
    pub fn network_policy(&self, record: &SandboxRecord) -> EffectivePolicy {
        EffectivePolicy::for_sandbox(&self.inner.config.network, record.settings.network.as_ref())
    }

    /// Serves `channel`, the daemon's end of sandbox `sandbox_id`'s worker channel, under the
    /// sandbox's policy (after its worker spawned, resumed, forked or restarted). Must run on
    /// the tokio runtime.
    pub fn attach_network(&self, sandbox_id: &str, channel: OwnedFd) -> Result<(), ManagerError> {
        let record = self
            .slot(sandbox_id)
            .map(|slot| slot.record())
            .ok_or_else(|| ManagerError::UnknownSandbox { id: sandbox_id.to_string(), listing: String::new() })?;
        let egress = self.inner.network.egress(self.network_policy(&record));
        self.inner.network.attach(sandbox_id, egress, channel).map_err(ManagerError::NetworkChannel)
    }

    /// The network refusals of sandbox `sandbox_id` since they were last taken, for a tool
    /// result to tell the model.
    pub fn take_network_refusals(&self, sandbox_id: &str) -> Vec<String> {
        self.inner.network.take_refusals(sandbox_id)
    }
}
