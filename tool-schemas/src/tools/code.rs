//! `run_code`: cells of code in persistent interpreter contexts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

// ---------------------------------------------------------------------------
// run_code
// ---------------------------------------------------------------------------

/// Run a cell of code in a persistent interpreter, like a Jupyter notebook:
/// variables, imports and functions survive between calls in the same context.
/// The value of the last expression is returned, stdout and stderr are
/// captured, exceptions come back as name, value and traceback, and matplotlib
/// figures come back as PNG images. Use this for computation, data analysis and
/// plots; use `run_command` for shell commands and programs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeParams {
    /// The code to run.
    pub code: String,
    /// Language of the code. Default: `python`.
    pub language: Option<Language>,
    /// Sandbox to run in. Default: this session's default sandbox (created on first use).
    pub sandbox_id: Option<String>,
    /// Name of the interpreter context; each context keeps its own state.
    /// Default: the language name (one shared context per language).
    pub context: Option<String>,
    /// Time limit in seconds; the cell is interrupted when it passes. Default 60, at most 3600.
    pub timeout_s: Option<u64>,
}

/// One rich result of a cell: the value of its last expression, or a display/figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CodeResult {
    /// Plain-text form, when the result has one.
    pub text: Option<String>,
    /// HTML form (e.g. a pandas table), when the result has one.
    pub html: Option<String>,
    /// Every MIME type the result came with (images are returned as image content).
    pub mime_types: Vec<String>,
    /// Whether this is the value of the cell's last expression.
    pub is_main_result: bool,
}

/// An exception raised by a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CodeErrorInfo {
    /// Exception type, e.g. `ZeroDivisionError`.
    pub name: String,
    /// Its message, e.g. `division by zero`.
    pub value: String,
    /// The traceback, without colours.
    pub traceback: String,
}

/// Result of `run_code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCodeResult {
    /// The sandbox it ran in.
    pub sandbox_id: String,
    /// The context it ran in.
    pub context: String,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
    /// Rich results: the last expression's value and displays. Images come as image content.
    pub results: Vec<CodeResult>,
    /// The exception, if the cell raised one.
    pub error: Option<CodeErrorInfo>,
    /// The context's cell counter after this cell.
    pub execution_count: u64,
    /// Wall time of the cell, in milliseconds.
    pub duration_ms: u64,
    /// Whether the cell was interrupted because it ran past `timeout_s`.
    pub timed_out: bool,
    /// Whether the interpreter had to restart, losing the context's variables.
    pub context_restarted: bool,
    /// For bash: the exit status of the cell's last command.
    pub exit_code: Option<i32>,
    /// Streams cut to fit this result, and where their full text lives.
    pub truncated: Vec<Truncation>,
    /// Displayed results left out because this result was full (the text says the limits).
    pub results_left_out: u64,
    /// Images left out because this result was full (the text says the limits).
    pub images_left_out: u64,
    /// A limit the cell ran into (the context was then restarted), if any.
    pub limit: Option<LimitHit>,
}
