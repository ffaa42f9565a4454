//! Sandboxes and the network broker: the policy a sandbox's record gives it under the server's
//! ceiling, and its worker's broker channel attached to the manager's [`NetworkBroker`].
//!
//! Each new worker (create, resume, fork, restart, and a live worker a restarted daemon finds)
//! listens on a broker socket of its own ([`crate::engine::Machine::network_socket`]); the
//! manager connects to it when the sandbox is recorded running on that worker
//! ([`Manager::link_network`]) and serves the channel. A sandbox whose network is `none` is
//! linked too: its egress refuses everything, and the refusals reach the model. A deleted
//! sandbox's channel is detached by the manager itself. Nothing here decides what a sandbox reaches: that is
//! [`crate::network::Egress`]'s.

use std::os::fd::OwnedFd;

use super::manager::{lock, Manager, ManagerError, Slot, SlotInner};
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

    /// Connects to the broker socket of `inner`'s live worker and serves it under the
    /// sandbox's policy. A machine without one (the test engine, a VM restored from a snapshot
    /// older than its network) has no network; a failure is logged, and the guest's stack then
    /// refuses every connection ("no network broker is connected").
    pub(super) fn link_network(&self, slot: &Slot, inner: &SlotInner) {
        let Some(path) = inner.machine.as_ref().and_then(|m| lock(m).network_socket()) else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::warn!(sandbox = %slot.id, "no runtime to serve the network broker on; the sandbox has no network");
            return;
        }
        let linked = capsule_vmm::net::broker_socket::connect(&path)
            .map_err(|e| capsule_vmm::worker::error_chain(&e))
            .and_then(|channel| {
                let egress = self.inner.network.egress(self.network_policy(&inner.record));
                self.inner.network.attach(&slot.id, egress, channel).map_err(|e| capsule_vmm::worker::error_chain(&e))
            });
        if let Err(why) = linked {
            tracing::warn!(sandbox = %slot.id, socket = %path.display(), "cannot link the network broker: {why}");
        }
    }
}
