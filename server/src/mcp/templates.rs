//! The template tools (`save_template`, `list_templates`), templates as MCP resources
//! (`capsule://templates/NAME`, read-only JSON), and how a template looks on the wire.

use capsule_tool_schemas::{
    ListTemplatesParams, ListTemplatesResult, SaveTemplateParams, SaveTemplateResult, TemplateInfo,
};
use rmcp::model::{CallToolResult, Resource, ResourceContents};

use super::shaping::tool_result;
use super::tool_error::ToolError;
use super::CapsuleMcp;
use crate::config::Limits;
use crate::record::TemplateRecord;
use crate::sandbox::admission::DEFAULT_TEMPLATE;

/// The URI scheme and prefix of template resources.
pub const TEMPLATE_URI_PREFIX: &str = "capsule://templates/";

/// A saved template as the tools report it.
pub fn template_info(t: &TemplateRecord) -> TemplateInfo {
    TemplateInfo {
        name: t.name.clone(),
        description: t.description.clone(),
        base: Some(t.base.clone()),
        saved_from: Some(t.saved_from.clone()),
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
        disk_mib: t.disk_mib,
        bytes: t.bytes,
        created_unix_ms: Some(t.created_ms),
        env: t.env.clone(),
        network: t.settings.network.clone(),
        builtin: false,
    }
}

/// The built-in template as the tools report it, with this server's default size.
pub fn builtin_info(limits: &Limits) -> TemplateInfo {
    TemplateInfo {
        name: DEFAULT_TEMPLATE.to_string(),
        description: Some(crate::builtin_template::description().to_string()),
        base: None,
        saved_from: None,
        vcpus: limits.default_vcpus,
        memory_mib: limits.default_memory_mib,
        disk_mib: limits.default_disk_mib,
        bytes: 0,
        created_unix_ms: None,
        env: Default::default(),
        network: None,
        builtin: true,
    }
}

impl CapsuleMcp {
    /// Every template this handler's owner may start sandboxes from, the built-in one first.
    fn visible_templates(&self) -> Result<Vec<TemplateInfo>, ToolError> {
        let saved = self.manager.templates(&self.owner)?;
        Ok(std::iter::once(builtin_info(&self.manager.config().limits))
            .chain(saved.iter().map(template_info))
            .collect())
    }

    pub(super) async fn save_template(&self, p: SaveTemplateParams) -> Result<CallToolResult, ToolError> {
        let (record, took) =
            self.manager.save_template(&self.owner, p.sandbox_id.as_deref(), &p.name, p.description).await?;
        let template = template_info(&record);
        let text = format!(
            "Saved sandbox {} as template {:?} ({} MiB on disk, {} ms). Start sandboxes from it with create_sandbox \
             {{\"template\": {:?}}}: they have its files, processes and interpreter state.",
            record.saved_from,
            record.name,
            record.bytes >> 20,
            took.as_millis(),
            record.name
        );
        let result = SaveTemplateResult { template, duration_ms: took.as_millis().try_into().unwrap_or(u64::MAX) };
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn list_templates(&self, _p: ListTemplatesParams) -> Result<CallToolResult, ToolError> {
        let templates = self.visible_templates()?;
        let mut text = String::new();
        for t in &templates {
            text.push_str(&format!(
                "{}  {} vCPU, {} MiB memory, {} MiB disk{}{}\n",
                t.name,
                t.vcpus,
                t.memory_mib,
                t.disk_mib,
                if t.builtin { ", built-in" } else { "" },
                t.description.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
            ));
        }
        Ok(tool_result(&ListTemplatesResult { templates }, text, Vec::new(), false))
    }

    /// The templates as MCP resources.
    pub(super) fn template_resources(&self) -> Result<Vec<Resource>, ToolError> {
        Ok(self
            .visible_templates()?
            .into_iter()
            .map(|t| {
                let resource = Resource::new(format!("{TEMPLATE_URI_PREFIX}{}", t.name), t.name.clone())
                    .with_mime_type("application/json");
                match &t.description {
                    Some(d) => resource.with_description(d.clone()),
                    None => resource,
                }
            })
            .collect())
    }

    /// The resource at `uri`: a template's JSON, or `None` when there is no such template.
    pub(super) fn template_resource(&self, uri: &str) -> Result<Option<ResourceContents>, ToolError> {
        let Some(name) = uri.strip_prefix(TEMPLATE_URI_PREFIX) else {
            return Ok(None);
        };
        let found = self.visible_templates()?.into_iter().find(|t| t.name == name);
        Ok(found.map(|t| {
            let text = serde_json::to_string_pretty(&t).unwrap_or_default();
            ResourceContents::TextResourceContents {
                uri: uri.to_string(),
                mime_type: Some("application/json".into()),
                text,
                meta: None,
            }
        }))
    }
}
