//! Templates in the manager: saving a sandbox's state as a template (`save_template`), the
//! catalogue of saved templates (the registry's `templates` table), and resolving a create's
//! template name to what the engine restores.
//!
//! A saved template belongs to the owner who saved it: only that owner (and owners who see
//! every sandbox) lists it and starts sandboxes from it. Templates built from a spec on the host
//! (`capsule template build`) belong to the host: every owner may use them. Its name is unique in the state
//! directory. Its size (vCPUs, memory, disk) is fixed by its memory and disk images, so a
//! create from it takes that size. The limits cap how many may be saved (0 disables saving)
//! and how many bytes they may take together. Like a fork, saving is refused while calls run in
//! the sandbox (taking its state resets its guest connections).

use std::time::{Duration, Instant};

use capsule_tool_schemas::{MAX_TEMPLATE_DESCRIPTION_BYTES, MAX_TEMPLATE_NAME_BYTES};

use super::admission::{self, CreateRequest, LimitError, DEFAULT_TEMPLATE, MAX_ENV_VARS};
use super::manager::{blocking, refuse_if_busy, unusable, Manager, ManagerError, Owner};
use crate::engine::MachineSpec;
use crate::record::{SandboxSettings, SandboxState, TemplateRecord, HOST_TEMPLATE_OWNER};
use crate::registry::now_ms;

/// Why a template name is not acceptable, or `None`.
pub fn bad_template_name(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_TEMPLATE_NAME_BYTES {
        return Some(format!("name must be 1 to {MAX_TEMPLATE_NAME_BYTES} characters long"));
    }
    if !name.chars().all(allowed) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some(format!(
            "name {name:?} must be made of a-z, 0-9, '-', '_' and '.', and start with a letter or digit"
        ));
    }
    if name == DEFAULT_TEMPLATE {
        return Some(format!("{DEFAULT_TEMPLATE:?} is the built-in template's name; choose another"));
    }
    None
}

impl Manager {
    /// Saves sandbox `id` (the owner's default when `None`), running or paused, as template
    /// `name`; returns it and how long saving took.
    pub async fn save_template(
        &self,
        owner: &Owner,
        id: Option<&str>,
        name: &str,
        description: Option<String>,
    ) -> Result<(TemplateRecord, Duration), ManagerError> {
        let (owner, id, name) = (owner.clone(), id.map(str::to_owned), name.to_owned());
        self.detached(|m| async move { m.save_template_owned(&owner, id.as_deref(), &name, description).await }).await
    }

    async fn save_template_owned(
        &self,
        owner: &Owner,
        id: Option<&str>,
        name: &str,
        description: Option<String>,
    ) -> Result<(TemplateRecord, Duration), ManagerError> {
        let started = Instant::now();
        if let Some(why) = bad_template_name(name) {
            return Err(ManagerError::BadParameter(why));
        }
        if description.as_ref().is_some_and(|d| d.len() > MAX_TEMPLATE_DESCRIPTION_BYTES) {
            return Err(ManagerError::BadParameter(format!(
                "description is longer than {MAX_TEMPLATE_DESCRIPTION_BYTES} bytes"
            )));
        }
        let limits = &self.inner.config.limits;
        let saved = self.inner.registry.templates()?;
        if saved.len() >= limits.max_saved_templates as usize {
            return Err(LimitError::Templates { max: limits.max_saved_templates, saved: saved.len() }.into());
        }
        if saved.iter().any(|t| t.name == name) {
            return Err(ManagerError::BadParameter(format!(
                "a template named {name:?} exists already; choose another name (or remove it with `capsule \
                 template rm {name}`)"
            )));
        }
        let slot = self.resolve(owner, id, false).await?;
        let mut inner = slot.inner.lock().await;
        match inner.record.state {
            SandboxState::Running | SandboxState::Paused => {}
            _ => return Err(unusable(&slot, &inner.record, "it cannot be saved as a template")),
        }
        refuse_if_busy(&slot, "save_template")?;
        let machine = self.machine_of(&slot, &mut inner)?;
        let created_ms = now_ms();
        let key = format!("{name}-{created_ms:x}");
        let made = blocking(&machine, move |m| m.save_template(&key)).await.map_err(ManagerError::Engine)?;
        let used: u64 = saved.iter().map(|t| t.bytes).sum();
        let max_bytes = limits.max_saved_template_mib.saturating_mul(1 << 20);
        if used.saturating_add(made.bytes) > max_bytes {
            self.inner.engine.remove_template(&made.engine_state);
            return Err(LimitError::TemplateBytes {
                used_mib: used >> 20,
                max_mib: limits.max_saved_template_mib,
                needed_mib: made.bytes.div_ceil(1 << 20),
            }
            .into());
        }
        let record = &inner.record;
        let template = TemplateRecord {
            name: name.to_string(),
            owner: owner.id.clone(),
            description,
            base: record.template.clone(),
            saved_from: record.id.clone(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            disk_mib: record.disk_mib,
            bytes: made.bytes,
            created_ms,
            engine: self.inner.engine.name().to_string(),
            engine_state: made.engine_state,
            spec_hash: None,
            env: record.env.clone(),
            settings: record.settings.clone(),
        };
        if !self.inner.registry.insert_template(&template)? {
            // Another save of the same name won the race.
            self.inner.engine.remove_template(&template.engine_state);
            return Err(ManagerError::BadParameter(format!("a template named {name:?} exists already")));
        }
        slot.touch();
        tracing::info!(template = name, sandbox = %slot.id, bytes = template.bytes, "template saved");
        Ok((template, started.elapsed()))
    }

    /// The saved templates `owner` may use, by name.
    pub fn templates(&self, owner: &Owner) -> Result<Vec<TemplateRecord>, ManagerError> {
        let all = self.inner.registry.templates()?;
        Ok(all
            .into_iter()
            .filter(|t| owner.sees_all || t.owner == owner.id || t.owner == HOST_TEMPLATE_OWNER)
            .collect())
    }

    /// What a create of `req` starts from: `None` for the built-in template, else the saved
    /// template, with `spec` given its size and its environment under the create's own. An
    /// unknown name is refused with the names `owner` may use.
    pub(super) fn template_of(
        &self,
        owner: &Owner,
        req: &CreateRequest,
        spec: &mut MachineSpec,
    ) -> Result<Option<TemplateRecord>, ManagerError> {
        if spec.template == DEFAULT_TEMPLATE {
            return Ok(None);
        }
        let mine = self.templates(owner)?;
        let Some(template) = mine.iter().find(|t| t.name == spec.template) else {
            let names: Vec<String> =
                std::iter::once(DEFAULT_TEMPLATE.to_string()).chain(mine.iter().map(|t| t.name.clone())).collect();
            return Err(ManagerError::BadParameter(format!(
                "unknown template {:?}; the templates are: {}",
                spec.template,
                names.join(", ")
            )));
        };
        if template.engine != self.inner.engine.name() {
            return Err(ManagerError::BadParameter(format!(
                "template {:?} was saved on the {} engine; this server runs the {} engine",
                template.name,
                template.engine,
                self.inner.engine.name()
            )));
        }
        let fixed = [
            ("vcpus", req.vcpus, template.vcpus),
            ("memory_mib", req.memory_mib, template.memory_mib),
            ("disk_mib", req.disk_mib, template.disk_mib),
        ];
        if let Some((field, asked, own)) = fixed.iter().find(|(_, asked, own)| asked.is_some_and(|a| a != *own)) {
            return Err(ManagerError::BadParameter(format!(
                "{field}={} does not fit template {:?}, whose memory and disk images fix {field}={own}; leave \
                 {field} out",
                asked.unwrap_or_default(),
                template.name
            )));
        }
        let mut env = template.env.clone();
        env.extend(std::mem::take(&mut spec.env));
        if env.len() > MAX_ENV_VARS {
            return Err(ManagerError::BadParameter(format!(
                "env: template {:?} sets {} variables and this create {} more, over the limit of {MAX_ENV_VARS}",
                template.name,
                template.env.len(),
                env.len() - template.env.len()
            )));
        }
        spec.env = env;
        spec.vcpus = template.vcpus;
        spec.memory_mib = template.memory_mib;
        spec.disk_mib = template.disk_mib;
        Ok(Some(template.clone()))
    }

    /// The settings of a sandbox created with `req` from `template`: each one the create does
    /// not name comes from the template, and the network must fit the server's policy.
    pub(super) fn settings_of(
        &self,
        req: &CreateRequest,
        template: Option<&TemplateRecord>,
    ) -> Result<SandboxSettings, ManagerError> {
        let inherited = template.map(|t| t.settings.clone()).unwrap_or_default();
        let settings = SandboxSettings {
            pids_max: req.pids_max.or(inherited.pids_max),
            network: req.network.clone().or(inherited.network),
        };
        let ceiling = &self.inner.config.network;
        match (template, &req.network) {
            (Some(t), None) if settings.network.is_some() => {
                admission::network(ceiling, settings.network.as_ref()).map_err(|e| {
                    ManagerError::BadParameter(format!(
                        "template {:?} gives its sandboxes the network it was saved with, which no longer fits: \
                         {e}; pass create_sandbox a network that fits",
                        t.name
                    ))
                })?;
            }
            _ => {
                admission::network(ceiling, settings.network.as_ref())?;
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_are_short_plain_and_not_the_built_in_one() {
        for good in ["ml", "sklearn-1.5", "a_b.c", "0day"] {
            assert_eq!(bad_template_name(good), None, "{good}");
        }
        for (bad, says) in [
            ("", "1 to 64"),
            (&"x".repeat(65) as &str, "1 to 64"),
            ("ML", "a-z"),
            ("-x", "start with"),
            ("a/b", "a-z"),
            ("a b", "a-z"),
            ("default", "built-in"),
        ] {
            let why = bad_template_name(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(why.contains(says), "{bad:?}: {why}");
        }
    }
}
