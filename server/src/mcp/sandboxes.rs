//! The sandbox tools (create, list, pause, resume, fork, restart, kill) and how a sandbox looks on the
//! wire: the manager's records mapped to the tool contract's types.

use std::time::Duration;

use capsule_tool_schemas::{
    CreateSandboxParams, CreateSandboxResult, ForkSandboxParams, ForkSandboxResult, KillSandboxParams,
    ListSandboxesParams, ListSandboxesResult, PauseSandboxParams, RestartSandboxParams, RestartSandboxResult,
    ResumeSandboxParams, SandboxInfo, SandboxResult, DEFAULT_PIDS_MAX,
};
use rmcp::model::CallToolResult;

use super::shaping::{push_section, tool_result};
use super::tool_error::ToolError;
use super::CapsuleMcp;
use crate::network::{EffectivePolicy, NetworkPolicy};
use crate::record::{SandboxRecord, SandboxState};
use crate::sandbox::CreateRequest;

/// A lifecycle state as the tools report it.
pub fn wire_state(state: SandboxState) -> capsule_tool_schemas::SandboxState {
    use capsule_tool_schemas::SandboxState as Wire;
    match state {
        SandboxState::Creating => Wire::Creating,
        SandboxState::Running => Wire::Running,
        SandboxState::Paused => Wire::Paused,
        SandboxState::Deleted => Wire::Deleted,
        SandboxState::Failed => Wire::Failed,
        SandboxState::Unresponsive => Wire::Unresponsive,
    }
}

/// A sandbox as the tools report it, under the server's network policy `ceiling`.
pub fn sandbox_info(record: &SandboxRecord, ceiling: &NetworkPolicy) -> SandboxInfo {
    SandboxInfo {
        sandbox_id: record.id.clone(),
        name: record.name.clone(),
        state: wire_state(record.state),
        template: record.template.clone(),
        vcpus: record.vcpus,
        memory_mib: record.memory_mib,
        disk_mib: record.disk_mib,
        idle_timeout_s: record.idle_timeout_ms / 1000,
        is_default: record.is_default,
        parent_id: record.parent_id.clone(),
        created_unix_ms: record.created_ms,
        failure: record.failure.clone(),
        pids_max: record.settings.pids_max.unwrap_or(DEFAULT_PIDS_MAX),
        network: EffectivePolicy::for_sandbox(ceiling, record.settings.network.as_ref()).mode(),
    }
}

impl CapsuleMcp {
    /// Appends what the network policy refused sandbox `id` since the last result, so the model
    /// learns why a connection failed.
    pub(super) fn push_network_refusals(&self, text: &mut String, id: &str) {
        let refusals = self.manager.take_network_refusals(id);
        push_section(text, Some("[network refused]"), &refusals.join("\n"));
    }

    /// [`sandbox_info`] under this server's policy.
    fn info(&self, record: &SandboxRecord) -> SandboxInfo {
        sandbox_info(record, &self.manager.config().network)
    }

    pub(super) async fn create_sandbox(&self, p: CreateSandboxParams) -> Result<CallToolResult, ToolError> {
        let req = CreateRequest {
            template: p.template,
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            disk_mib: p.disk_mib,
            idle_timeout: p.idle_timeout_s.map(Duration::from_secs),
            env: p.env.unwrap_or_default(),
            name: p.name,
            make_default: p.make_default,
            pids_max: p.pids_max,
            network: p.network,
        };
        if req.idle_timeout == Some(Duration::ZERO) {
            return Err(ToolError::BadParameter("idle_timeout_s must be at least 1".into()));
        }
        let sandbox = self.info(&self.manager.create(&self.owner, req).await?);
        let text = format!(
            "Created sandbox {} ({} vCPU, {} MiB memory, {} MiB disk, network {}){}. Pass sandbox_id=\"{}\" to \
             use it.",
            sandbox.sandbox_id,
            sandbox.vcpus,
            sandbox.memory_mib,
            sandbox.disk_mib,
            sandbox.network.as_str(),
            if sandbox.is_default { "; it is this session's default sandbox" } else { "" },
            sandbox.sandbox_id
        );
        Ok(tool_result(&CreateSandboxResult { sandbox }, text, Vec::new(), false))
    }

    pub(super) async fn list_sandboxes(&self, _p: ListSandboxesParams) -> Result<CallToolResult, ToolError> {
        let (records, default_sandbox_id) = self.manager.list(&self.owner);
        let sandboxes: Vec<SandboxInfo> = records.iter().map(|r| self.info(r)).collect();
        let mut text = String::new();
        for (s, info) in records.iter().zip(&sandboxes) {
            text.push_str(&format!(
                "{}  {}  {} vCPU, {} MiB, network {}{}{}{}\n",
                s.id,
                s.state.as_str(),
                s.vcpus,
                s.memory_mib,
                info.network.as_str(),
                if s.template == crate::sandbox::admission::DEFAULT_TEMPLATE {
                    String::new()
                } else {
                    format!(", template {}", s.template)
                },
                s.name.as_ref().map(|n| format!(", name {n:?}")).unwrap_or_default(),
                if s.is_default { ", default" } else { "" }
            ));
        }
        if sandboxes.is_empty() {
            text = "No sandboxes yet. run_code or run_command creates the default sandbox on first use.".into();
        }
        Ok(tool_result(&ListSandboxesResult { sandboxes, default_sandbox_id }, text, Vec::new(), false))
    }

    pub(super) async fn pause(&self, p: PauseSandboxParams) -> Result<CallToolResult, ToolError> {
        let sandbox = self.info(&self.manager.pause(&self.owner, p.sandbox_id.as_deref()).await?);
        let text = format!("Sandbox {} is paused. Any call on it resumes it.", sandbox.sandbox_id);
        Ok(tool_result(&SandboxResult { sandbox }, text, Vec::new(), false))
    }

    pub(super) async fn resume(&self, p: ResumeSandboxParams) -> Result<CallToolResult, ToolError> {
        let sandbox = self.info(&self.manager.resume(&self.owner, p.sandbox_id.as_deref()).await?);
        let text = format!("Sandbox {} is running.", sandbox.sandbox_id);
        Ok(tool_result(&SandboxResult { sandbox }, text, Vec::new(), false))
    }

    pub(super) async fn fork(&self, p: ForkSandboxParams) -> Result<CallToolResult, ToolError> {
        let count = p.count.unwrap_or(1);
        let (parent_id, records) = self.manager.fork(&self.owner, p.sandbox_id.as_deref(), count).await?;
        let sandboxes: Vec<SandboxInfo> = records.iter().map(|r| self.info(r)).collect();
        let ids: Vec<&str> = sandboxes.iter().map(|s| s.sandbox_id.as_str()).collect();
        let note = self.manager.fork_note().map(str::to_string);
        let mut text = format!("Forked {parent_id} into {}: {}.", ids.len(), ids.join(", "));
        if let Some(n) = &note {
            push_section(&mut text, None, n);
        }
        Ok(tool_result(&ForkSandboxResult { parent_id, sandboxes, note }, text, Vec::new(), false))
    }

    pub(super) async fn restart_sandbox(&self, p: RestartSandboxParams) -> Result<CallToolResult, ToolError> {
        let (record, was) = self.manager.restart(&self.owner, p.sandbox_id.as_deref()).await?;
        let sandbox = self.info(&record);
        let note = format!(
            "Sandbox {} was {}; its VM was booted again on its own disk: its files are kept, but the processes \
             and interpreter state it had are gone (run setup cells again).",
            sandbox.sandbox_id,
            was.as_str()
        );
        Ok(tool_result(&RestartSandboxResult { sandbox, note: note.clone() }, note, Vec::new(), false))
    }

    pub(super) async fn kill_sandbox(&self, p: KillSandboxParams) -> Result<CallToolResult, ToolError> {
        let sandbox = self.info(&self.manager.kill(&self.owner, &p.sandbox_id).await?);
        let text = format!("Sandbox {} is deleted.", sandbox.sandbox_id);
        Ok(tool_result(&SandboxResult { sandbox }, text, Vec::new(), false))
    }
}
