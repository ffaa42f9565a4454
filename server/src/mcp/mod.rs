//! The MCP face of capsule: one handler shared by the stdio and HTTP transports.
//!
//! - [`CapsuleMcp`]: the rmcp `ServerHandler`. It lists exactly the tools of
//!   `capsule-tool-schemas` (names, descriptions, annotations, input and output
//!   schemas come from there, so the golden files are what clients see) and
//!   dispatches calls to the tools: [`code`], [`processes`], [`files`], [`sandboxes`],
//!   [`templates`], over the shared call machinery of [`handler`]. Templates are also its
//!   resources (read-only).
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
pub mod tasks;
pub mod templates;
pub mod tool_error;

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, GetTaskResult, Implementation,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
    UpdateTaskParams,
};
#[allow(deprecated)]
use rmcp::model::{LoggingLevel, LoggingMessageNotificationParam, SetLevelRequestParams};
use rmcp::service::RequestContext;
use rmcp::task_manager::TaskManager;
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
    /// An HTTP session's own owner for its 2025-11-25 requests; a 2026-07-28 request, which has
    /// no session, acts for its client's name instead (`http-client:NAME`, from the request's
    /// `_meta`). Only a server with a bearer token offers 2026-07-28 over HTTP, so that name is
    /// claimed only by token holders.
    Session(Owner),
}

/// Longest client name taken as an owner, in bytes (a longer one is ignored).
pub const MAX_CLIENT_NAME_BYTES: usize = 128;

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
    /// For a 2026-07-28 request, the log level its `_meta` asks for (`None` inside: no log
    /// messages at all); `None` for a 2025-11-25 session, which uses `logging/setLevel`.
    request_log_severity: Option<Option<u8>>,
    /// Whether the sessionless revision 2026-07-28 is offered (see [`OwnerSource::Session`]).
    offers_stateless: bool,
    /// Long calls running as tasks (`io.modelcontextprotocol/tasks`), shared by every handler
    /// of a transport (see [`tasks`]).
    tasks: TaskManager,
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
            OwnerSource::Fixed(owner) | OwnerSource::Session(owner) => owner.clone(),
            OwnerSource::Client { name } => client_owner(name.as_deref().unwrap_or("unknown")),
        };
        CapsuleMcp {
            manager,
            owner_source: source,
            owner,
            shaping,
            log_min_severity: Arc::new(Mutex::new(1)),
            request_log_severity: None,
            offers_stateless: true,
            tasks: TaskManager::new(),
        }
    }

    /// This handler, keeping its tasks in `tasks` (a transport whose handlers are made per
    /// request shares one store, so that a task made by one request is found by the next).
    pub fn with_tasks(self, tasks: TaskManager) -> CapsuleMcp {
        CapsuleMcp { tasks, ..self }
    }

    /// This handler, offering the sessionless revision 2026-07-28 or not (an HTTP server
    /// without a token, whose sessions are the only identity its clients have).
    pub fn offering_stateless(self, offers: bool) -> CapsuleMcp {
        CapsuleMcp { offers_stateless: offers, ..self }
    }

    /// The owner this handler acts as (before a request names its client).
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// This handler as it serves `context`'s request: for a client-identified owner, the
    /// client's name comes from the request (2026-07-28 `_meta`) or from its `initialize`; a
    /// 2026-07-28 request over an HTTP session-owned connection acts for its client's name; and
    /// a 2026-07-28 request's log level is its own.
    fn for_request(&self, context: &RequestContext<RoleServer>) -> CapsuleMcp {
        let stateless = context.meta.protocol_version().is_some();
        let mut this = self.clone();
        if stateless {
            this.request_log_severity = Some(context.meta.log_level().map(severity));
        }
        let client_name = |client: Option<Implementation>| {
            client.map(|c| c.name).filter(|n| !n.is_empty() && n.len() <= MAX_CLIENT_NAME_BYTES)
        };
        match &self.owner_source {
            OwnerSource::Client { name: None } => {
                let client =
                    context.meta.client_info().or_else(|| context.peer.peer_info().map(|i| i.client_info.clone()));
                if let Some(name) = client_name(client) {
                    this.owner = client_owner(&name);
                }
            }
            OwnerSource::Session(_) if stateless => {
                let name = client_name(context.meta.client_info()).unwrap_or_else(|| "unknown".into());
                this.owner = Owner::new(format!("http-client:{name}"));
            }
            OwnerSource::Fixed(_) | OwnerSource::Client { .. } | OwnerSource::Session(_) => {}
        }
        this
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
        let min = match self.request_log_severity {
            // A 2026-07-28 request gets log messages only when its `_meta` asks for them.
            Some(asked) => match asked {
                Some(min) => min,
                None => return,
            },
            None => *self.log_min_severity.lock().unwrap_or_else(|e| e.into_inner()),
        };
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
    /// Both eras: 2025-11-25 (and older) with the `initialize` handshake, and the sessionless
    /// 2026-07-28 (`server/discover`, per-request `_meta`), which rmcp serves on the same
    /// endpoints. A 2026-07-28 request's owner is its client's name (see [`OwnerSource`]); an
    /// HTTP server without a token, whose sessions are its clients' only identity, offers only
    /// the versions with sessions.
    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        let newest =
            if self.offers_stateless { ProtocolVersion::LATEST } else { ProtocolVersion::LATEST_WITH_INITIALIZE };
        std::borrow::Cow::Borrowed(ProtocolVersion::known_up_to(&newest))
    }

    #[allow(deprecated)]
    fn get_info(&self) -> ServerConfig {
        let capabilities =
            ServerCapabilities::builder().enable_tools().enable_logging().enable_resources().enable_tasks().build();
        ServerConfig::new(capabilities)
            .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
            .with_server_info(Implementation::new("capsule", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let this = self.for_request(&context);
        let resources = this.template_resources().map_err(|e| McpError::internal_error(e.message(), None))?;
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let this = self.for_request(&context);
        match this.template_resource(&request.uri).map_err(|e| McpError::internal_error(e.message(), None))? {
            Some(contents) => Ok(ReadResourceResult::new(vec![contents]).into()),
            None => Err(McpError::resource_not_found(
                format!(
                    "no resource {:?}; resources/list lists the templates ({}NAME)",
                    request.uri,
                    templates::TEMPLATE_URI_PREFIX
                ),
                None,
            )),
        }
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
        let this = self.for_request(&context);
        if tasks::runs_as_task(&request.name, &context) {
            return Ok(this.spawn_task(request, context));
        }
        let args = serde_json::Value::Object(request.arguments.unwrap_or_default());
        Ok(this.run_tool(request.name.as_ref(), args, &context).await?.into())
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.tasks.update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.tasks.cancel_task(&request.task_id)
    }
}

impl CapsuleMcp {
    /// Runs tool `name` with `args` for the request `ctx` (already resolved with
    /// [`CapsuleMcp::for_request`]); an unknown tool is a protocol error.
    pub(crate) async fn run_tool(
        &self,
        name: &str,
        args: serde_json::Value,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResult, McpError> {
        let result = match name {
            "run_code" => dispatch(name, args, |p| self.run_code(p, ctx)).await,
            "run_command" => dispatch(name, args, |p| self.run_command(p, ctx)).await,
            "read_process" => dispatch(name, args, |p| self.read_process(p)).await,
            "kill_process" => dispatch(name, args, |p| self.kill_process(p)).await,
            "write_process" => dispatch(name, args, |p| self.write_process(p)).await,
            "write_file" => dispatch(name, args, |p| self.write_file(p)).await,
            "read_file" => dispatch(name, args, |p| self.read_file(p)).await,
            "list_files" => dispatch(name, args, |p| self.list_files(p)).await,
            "create_sandbox" => dispatch(name, args, |p| self.create_sandbox(p)).await,
            "list_sandboxes" => dispatch(name, args, |p| self.list_sandboxes(p)).await,
            "pause" => dispatch(name, args, |p| self.pause(p)).await,
            "resume" => dispatch(name, args, |p| self.resume(p)).await,
            "fork" => dispatch(name, args, |p| self.fork(p)).await,
            "restart_sandbox" => dispatch(name, args, |p| self.restart_sandbox(p)).await,
            "kill_sandbox" => dispatch(name, args, |p| self.kill_sandbox(p)).await,
            "save_template" => dispatch(name, args, |p| self.save_template(p)).await,
            "list_templates" => dispatch(name, args, |p| self.list_templates(p)).await,
            other => {
                return Err(McpError::invalid_params(
                    format!("unknown tool {other:?}; call tools/list for the tools this server has"),
                    None,
                ))
            }
        };
        Ok(self.with_notice(result))
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
