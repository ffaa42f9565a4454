//! Long calls under the tasks extension (`io.modelcontextprotocol/tasks`): a client that
//! declares it gets `run_code` and `run_command` answered at once with a task handle, polls
//! `tasks/get` until the call's result is there, and may `tasks/cancel` it (the command is then
//! stopped as a cancelled request stops it). So a call may outlive the client's request
//! timeout without being cut off. Clients that do not declare the extension get plain results,
//! as before.
//!
//! rmcp's [`TaskManager`] keeps the tasks (their state, results, TTL expiry). Task ids are
//! random UUIDs: knowing one is what it takes to read or cancel its task. Tasks live as long as
//! the transport's task store: a stdio connection's, or the HTTP listener's.

use rmcp::model::{CallToolRequestParams, CallToolResponse, CreateTaskResult};
use rmcp::service::RequestContext;
use rmcp::task_manager::{TaskExit, TaskOptions};
use rmcp::RoleServer;
use tokio_util::sync::CancellationToken;

use super::CapsuleMcp;

/// The tools whose calls may run as tasks: the ones that can take long.
const TASK_TOOLS: [&str; 2] = ["run_code", "run_command"];
/// How often a client is told to poll, in milliseconds.
const POLL_INTERVAL_MS: u64 = 250;
/// How long a task and its result are kept, in milliseconds (past the longest call's time limit).
const TASK_TTL_MS: u64 = (capsule_tool_schemas::MAX_TIMEOUT_S + 600) * 1000;

/// Whether a call of `tool` for `context`'s request runs as a task: a long tool, and a client
/// that declared the tasks extension.
pub fn runs_as_task(tool: &str, context: &RequestContext<RoleServer>) -> bool {
    TASK_TOOLS.contains(&tool) && context.client_capabilities().is_some_and(|caps| caps.supports_tasks())
}

impl CapsuleMcp {
    /// Starts `request` as a task and answers its handle. The call runs with a cancellation of
    /// its own (the request that made it ends now), which `tasks/cancel` triggers; the task
    /// then waits for the call to stop its command before it reports itself cancelled.
    pub(super) fn spawn_task(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> CallToolResponse {
        let this = self.clone();
        let mut call_context = context;
        call_context.ct = CancellationToken::new();
        let options = TaskOptions::new()
            .with_ttl_ms(TASK_TTL_MS)
            .with_poll_interval_ms(POLL_INTERVAL_MS)
            .with_status_message(format!("{} is running", request.name));
        let task = self.tasks.spawn(options, move |task| {
            Box::pin(async move {
                let name = request.name.to_string();
                let args = serde_json::Value::Object(request.arguments.unwrap_or_default());
                let cancel = call_context.ct.clone();
                let call = this.run_tool(&name, args, &call_context);
                tokio::pin!(call);
                let result = tokio::select! {
                    result = &mut call => result,
                    () = task.cancelled() => {
                        cancel.cancel();
                        call.await
                    }
                };
                match result {
                    _ if task.is_cancel_requested() => Err(TaskExit::Cancelled),
                    Ok(result) => Ok(result),
                    Err(error) => Err(TaskExit::Error(error)),
                }
            })
        });
        CallToolResponse::Task(CreateTaskResult::new(task))
    }
}
