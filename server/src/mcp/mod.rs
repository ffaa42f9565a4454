//! The MCP face of capsule: one handler shared by the stdio and HTTP transports.
//!
//! - [`CapsuleMcp`]: the rmcp `ServerHandler`. It lists exactly the tools of
//!   `capsule-tool-schemas` (names, descriptions, annotations, input and output
//!   schemas come from there, so the golden files are what clients see) and
//!   dispatches calls to the tools: [`code`], [`processes`], [`files`], [`sandboxes`], over the
//!   shared call machinery of [`handler`].
//! - [`shaping`]: what results look like.
//! - [`http`]: streamable HTTP at `/mcp` with token and Origin checks.
//!
//! Protocol misuse (unknown tool) is a JSON-RPC error; everything a model can
//! fix (bad arguments included) is an `isError` result.

pub mod code;
pub mod files;
pub mod handler;
pub mod http;
pub mod processes;
pub mod sandboxes;
pub mod shaping;
pub mod tool_error;

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult, PaginatedRequestParams, ProtocolVersion,
    ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
#[allow(deprecated)]
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam, SetLevelRequestParams};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, Peer, RoleServer, ServerHandler};
use serde::de::DeserializeOwned;

use crate::sandbox::{Manager, Owner};
use shaping::{error_result, Shaping};

/// What the server tells clients about itself.
pub const INSTRUCTIONS: &str = "capsule gives you disposable Linux sandboxes (microVMs) with Python \
(numpy, pandas, matplotlib), Node.js and bash. Just call run_code or run_command: a default sandbox is \
created on first use and reused, so sandbox_id is optional everywhere. Interpreter state persists between \
run_code calls. Idle sandboxes pause themselves and resume on the next call. Use fork to branch \
a sandbox's state, and kill_sandbox when you are done with one.";

/// Whose sandboxes a connection's calls act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerSource {
    /// Always this owner (an HTTP session, or a token that names its owner).
    Fixed(Owner),
    /// The MCP client's identity: `name` when given (`capsule serve --owner`), else the
    /// `clientInfo.name` the client sends, so that a restarted client finds its default
    /// sandbox again and two different clients never share one.
    Client {
        /// The name given instead of the client's own.
        name: Option<String>,
    },
}

/// The owner id of the client named `name`.
pub fn client_owner(name: &str) -> Owner {
    Owner::new(format!("client:{name}"))
}

/// The MCP handler of one connection.
#[derive(Clone)]
pub struct CapsuleMcp {
    manager: Manager,
    owner_source: OwnerSource,
    /// The owner of the call being served (resolved per request from `owner_source`).
    owner: Owner,
    shaping: Shaping,
    /// Level set by `logging/setLevel` (severity number; output chunks are "info" = 1).
    log_min_severity: Arc<Mutex<u8>>,
}

impl std::fmt::Debug for CapsuleMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleMcp").field("owner", &self.owner).finish()
    }
}

#[allow(deprecated)]
fn severity(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

impl CapsuleMcp {
    /// A handler for one session acting as `owner`.
    pub fn new(manager: Manager, owner: Owner, shaping: Shaping) -> CapsuleMcp {
        CapsuleMcp::with_owner_source(manager, OwnerSource::Fixed(owner), shaping)
    }

    /// A handler whose calls act for the owner `source` names.
    pub fn with_owner_source(manager: Manager, source: OwnerSource, shaping: Shaping) -> CapsuleMcp {
        let owner = match &source {
            OwnerSource::Fixed(owner) => owner.clone(),
            OwnerSource::Client { name } => client_owner(name.as_deref().unwrap_or("unknown")),
        };
        CapsuleMcp { manager, owner_source: source, owner, shaping, log_min_severity: Arc::new(Mutex::new(1)) }
    }

    /// The owner this handler acts as (before a request names its client).
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// This handler as it serves `context`'s request: for a client-identified owner, the
    /// client's name comes from the request (2026-07-28 `_meta`) or from its `initialize`.
    fn for_request(&self, context: &RequestContext<RoleServer>) -> CapsuleMcp {
        let OwnerSource::Client { name: None } = &self.owner_source else {
            return self.clone();
        };
        let client = context.meta.client_info().or_else(|| context.peer.peer_info().map(|i| i.client_info.clone()));
        let name = client.map(|c| c.name).filter(|n| !n.is_empty() && n.len() <= 128);
        match name {
            Some(name) => CapsuleMcp { owner: client_owner(&name), ..self.clone() },
            None => self.clone(),
        }
    }

    /// The MCP tool definitions, from the contract crate.
    pub fn tools() -> Vec<Tool> {
        capsule_tool_schemas::catalog()
            .into_iter()
            .map(|spec| {
                Tool::new_with_raw(spec.name, Some(spec.description().into()), Arc::new(spec.input_schema()))
                    .with_title(spec.title)
                    .with_raw_output_schema(Arc::new(spec.output_schema()))
                    .with_annotations(ToolAnnotations::from_raw(
                        Some(spec.title.to_string()),
                        Some(spec.read_only),
                        Some(spec.destructive),
                        Some(spec.idempotent),
                        Some(spec.open_world),
                    ))
            })
            .collect()
    }

    /// Sends one output chunk as a logging notification (level info, logger "output").
    #[allow(deprecated)]
    async fn log_output(&self, peer: &Peer<RoleServer>, data: serde_json::Value) {
        let min = *self.log_min_severity.lock().unwrap_or_else(|e| e.into_inner());
        if severity(LoggingLevel::Info) < min {
            return;
        }
        let mut param = LoggingMessageNotificationParam::new(LoggingLevel::Info, data);
        param.logger = Some("output".into());
        let _ = peer.notify_logging_message(param).await;
    }
}

async fn dispatch<P, F>(name: &str, args: serde_json::Value, f: impl FnOnce(P) -> F) -> rmcp::model::CallToolResult
where
    P: DeserializeOwned,
    F: std::future::Future<Output = Result<rmcp::model::CallToolResult, tool_error::ToolError>>,
{
    match serde_json::from_value::<P>(args) {
        Ok(params) => f(params).await.unwrap_or_else(tool_error::ToolError::into_result),
        Err(e) => error_result(format!(
            "invalid parameters for {name}: {e}. Check the tool's input schema and call it again."
        )),
    }
}

impl ServerHandler for CapsuleMcp {
    /// Sandboxes belong to MCP sessions (the default sandbox, isolation over
    /// HTTP), so only protocol versions that have sessions are offered: the
    /// sessionless 2026-07-28 revision would give every request a new owner.
    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        std::borrow::Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::LATEST_WITH_INITIALIZE))
    }

    #[allow(deprecated)]
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder().enable_tools().enable_logging().build();
        ServerConfig::new(capabilities)
            .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
            .with_server_info(Implementation::new("capsule", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(Self::tools()))
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        *self.log_min_severity.lock().unwrap_or_else(|e| e.into_inner()) = severity(request.level);
        Ok(())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let args = serde_json::Value::Object(request.arguments.unwrap_or_default());
        let name = request.name.as_ref();
        let ctx = &context;
        let this = self.for_request(ctx);
        let self_ = &this;
        let result = match name {
            "run_code" => dispatch(name, args, |p| self_.run_code(p, ctx)).await,
            "run_command" => dispatch(name, args, |p| self_.run_command(p, ctx)).await,
            "read_process" => dispatch(name, args, |p| self_.read_process(p)).await,
            "kill_process" => dispatch(name, args, |p| self_.kill_process(p)).await,
            "write_process" => dispatch(name, args, |p| self_.write_process(p)).await,
            "write_file" => dispatch(name, args, |p| self_.write_file(p)).await,
            "read_file" => dispatch(name, args, |p| self_.read_file(p)).await,
            "list_files" => dispatch(name, args, |p| self_.list_files(p)).await,
            "create_sandbox" => dispatch(name, args, |p| self_.create_sandbox(p)).await,
            "list_sandboxes" => dispatch(name, args, |p| self_.list_sandboxes(p)).await,
            "pause" => dispatch(name, args, |p| self_.pause(p)).await,
            "resume" => dispatch(name, args, |p| self_.resume(p)).await,
            "fork" => dispatch(name, args, |p| self_.fork(p)).await,
            "restart_sandbox" => dispatch(name, args, |p| self_.restart_sandbox(p)).await,
            "kill_sandbox" => dispatch(name, args, |p| self_.kill_sandbox(p)).await,
            other => {
                return Err(McpError::invalid_params(
                    format!("unknown tool {other:?}; call tools/list for the tools this server has"),
                    None,
                ))
            }
        };
        Ok(this.with_notice(result).into())
    }
}

impl CapsuleMcp {
    /// `result` with, first, anything its sandbox's owner has not been told yet (a roll-back
    /// while the server was down).
    fn with_notice(&self, mut result: rmcp::model::CallToolResult) -> rmcp::model::CallToolResult {
        let id = result.structured_content.as_ref().and_then(|s| s.get("sandbox_id")).and_then(|v| v.as_str());
        if let Some(notice) = id.and_then(|id| self.manager.take_notice(id)) {
            result.content.insert(0, rmcp::model::ContentBlock::text(format!("Note: {notice}")));
        }
        result
    }
}
