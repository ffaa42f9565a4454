//! The template tools: `save_template` and `list_templates`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::network::NetworkRequest;

/// Longest template name, in bytes.
pub const MAX_TEMPLATE_NAME_BYTES: usize = 64;
/// Longest template description, in bytes.
pub const MAX_TEMPLATE_DESCRIPTION_BYTES: usize = 1024;

/// Save a sandbox's current state as a template that new sandboxes start from: its files and
/// its memory (Python variables and imports, running processes), taken the same way as `fork`.
/// Use it after setting up an environment (packages installed, data loaded, a model warmed) to
/// start any number of fresh sandboxes from that point with `create_sandbox {"template": NAME}`.
/// The sandbox is left as it was. A template keeps the size (vCPUs, memory, disk) of the
/// sandbox it was saved from, and sandboxes made from it start with its environment variables
/// and network unless their `create_sandbox` names others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveTemplateParams {
    /// Sandbox to save (running or paused). Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// The template's name: 1 to 64 characters of `a-z`, `0-9`, `-`, `_` and `.`, starting with
    /// a letter or digit; not `default`, and not the name of a template that exists.
    pub name: String,
    /// What the template holds, for whoever picks one later (at most 1024 characters).
    pub description: Option<String>,
}

/// Result of `save_template`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SaveTemplateResult {
    /// The new template.
    pub template: TemplateInfo,
    /// How long saving took, in milliseconds.
    pub duration_ms: u64,
}

/// List the templates new sandboxes can start from (`create_sandbox {"template": NAME}`):
/// the built-in `default` and the ones saved with `save_template`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListTemplatesParams {}

/// Result of `list_templates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListTemplatesResult {
    /// The templates, the built-in one first, then by name.
    pub templates: Vec<TemplateInfo>,
}

/// One template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TemplateInfo {
    /// Its name, as `create_sandbox` takes it.
    pub name: String,
    /// What it holds.
    pub description: Option<String>,
    /// The template the saved sandbox itself started from (`None` for the built-in one).
    pub base: Option<String>,
    /// The sandbox it was saved from (`None` for the built-in one).
    pub saved_from: Option<String>,
    /// vCPUs of sandboxes made from it (fixed by its memory image for saved templates).
    pub vcpus: u32,
    /// Memory of sandboxes made from it, in MiB (fixed for saved templates; the server's
    /// default for the built-in one).
    pub memory_mib: u32,
    /// Writable disk of sandboxes made from it, in MiB (fixed for saved templates).
    pub disk_mib: u32,
    /// Bytes the saved template's memory and disk images take on the host's disk (some are
    /// shared by hard links with the template it came from; 0 for the built-in one).
    pub bytes: u64,
    /// When it was saved, in milliseconds since the Unix epoch (`None` for the built-in one).
    pub created_unix_ms: Option<u64>,
    /// Environment variables sandboxes made from it start with (a create's `env` adds to them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The network sandboxes made from it get unless their create names one (absent: the
    /// server's policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Whether it is the built-in template.
    pub builtin: bool,
}
