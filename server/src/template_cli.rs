//! `capsule template`: the templates saved with `save_template`, for a human on the host:
//! `list`, `show NAME`, `rm NAME [--force]`, and `build FILE` (see `template_build`). It reads and writes the registry of the state
//! directory directly (SQLite serializes it with a running daemon, which reads templates from
//! it on every call). Removing a template never breaks a sandbox made from it (those hold hard
//! links or copies of its files), but one that live sandboxes came from is refused without
//! `--force`, with their ids.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::mcp::templates::template_info;
use crate::record::TemplateRecord;
use crate::registry::{Registry, RegistryError};
use crate::settings::SettingsArgs;

/// Where saved templates' files live under an engine's root.
const USER_TEMPLATES_DIR: &str = ".user-templates";

/// Errors of `capsule template`.
#[derive(Debug, thiserror::Error)]
pub enum TemplateCliError {
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The state directory could not be found.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// No template of that name.
    #[error("no saved template {name:?}; the saved ones are: {listing}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The saved ones.
        listing: String,
    },
    /// Live sandboxes came from the template.
    #[error("template {name:?} is in use by {}; pass --force to remove it anyway (they keep working)", .ids.join(", "))]
    InUse {
        /// The template.
        name: String,
        /// The sandboxes.
        ids: Vec<String>,
    },
    /// The build failed.
    #[error(transparent)]
    Build(#[from] Box<crate::template_build::BuildError>),
    /// Its files could not be deleted.
    #[error("template {name:?} is forgotten, but its files in {dir} could not be deleted")]
    Files {
        /// The template.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `capsule template` subcommands.
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the saved templates.
    List {
        /// Print JSON (the `list_templates` tool's entries) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Show one saved template as JSON.
    Show {
        /// The template's name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Remove a saved template (refused while live sandboxes came from it, unless --force).
    Rm(RmArgs),
    /// Build a template from a TOML spec (packages, files, steps, a warm-up), through the
    /// host's daemon; instant when nothing changed. See the README's Templates section.
    Build {
        /// The spec file.
        file: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

/// Arguments of `capsule template rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The template's name.
    pub name: String,
    /// Remove it even if live sandboxes came from it (they keep working).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// Runs a `capsule template` subcommand; returns what to print.
pub fn run(command: TemplateCommand) -> Result<String, TemplateCliError> {
    match command {
        TemplateCommand::List { json, settings } => {
            let templates = open(&settings)?.templates()?;
            if json {
                let infos: Vec<_> = templates.iter().map(template_info).collect();
                return Ok(serde_json::to_string_pretty(&infos).unwrap_or_default() + "\n");
            }
            Ok(render(&templates))
        }
        TemplateCommand::Show { name, settings } => {
            let registry = open(&settings)?;
            let template = find(&registry, &name)?;
            Ok(serde_json::to_string_pretty(&template_info(&template)).unwrap_or_default() + "\n")
        }
        TemplateCommand::Build { file, settings } => {
            crate::template_build::build(&file, &settings).map_err(|e| TemplateCliError::Build(Box::new(e)))
        }
        TemplateCommand::Rm(args) => {
            let state_dir = crate::settings::resolve(&args.settings)?.state_dir;
            let registry = Registry::open(&state_dir)?;
            remove(&registry, &state_dir, &args.name, args.force)?;
            Ok(format!("removed template {:?}\n", args.name))
        }
    }
}

fn open(settings: &SettingsArgs) -> Result<Registry, TemplateCliError> {
    Ok(Registry::open(&crate::settings::resolve(settings)?.state_dir)?)
}

fn find(registry: &Registry, name: &str) -> Result<TemplateRecord, TemplateCliError> {
    let all = registry.templates()?;
    match all.iter().find(|t| t.name == name) {
        Some(t) => Ok(t.clone()),
        None => {
            let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
            let listing = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            Err(TemplateCliError::Unknown { name: name.to_string(), listing })
        }
    }
}

/// Forgets template `name` and deletes its files (under `state_dir`), unless live sandboxes
/// came from it and `force` is not given.
pub fn remove(registry: &Registry, state_dir: &Path, name: &str, force: bool) -> Result<(), TemplateCliError> {
    let template = find(registry, name)?;
    let users: Vec<String> = registry.load_live()?.into_iter().filter(|s| s.template == name).map(|s| s.id).collect();
    if !users.is_empty() && !force {
        return Err(TemplateCliError::InUse { name: name.to_string(), ids: users });
    }
    registry.delete_template(name)?;
    let dir = template.engine_state.get("dir").and_then(|d| d.as_str()).map(PathBuf::from);
    // Only a directory of saved templates inside this state directory is ever deleted.
    let ours = |d: &PathBuf| {
        d.starts_with(state_dir) && d.parent().and_then(Path::file_name).is_some_and(|n| n == USER_TEMPLATES_DIR)
    };
    if let Some(dir) = dir.filter(ours).filter(|d| d.exists()) {
        std::fs::remove_dir_all(&dir).map_err(|source| TemplateCliError::Files {
            name: name.to_string(),
            dir: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The saved templates as a table.
fn render(templates: &[TemplateRecord]) -> String {
    if templates.is_empty() {
        return "no saved templates (the built-in `default` is always there)\n".into();
    }
    let mut out = format!(
        "{:<24} {:>6} {:>8} {:>8} {:>10}  {:<16} {}\n",
        "NAME", "VCPUS", "MEM_MIB", "DISK_MIB", "SIZE_MIB", "FROM", "DESCRIPTION"
    );
    for t in templates {
        out.push_str(&format!(
            "{:<24} {:>6} {:>8} {:>8} {:>10}  {:<16} {}\n",
            t.name,
            t.vcpus,
            t.memory_mib,
            t.disk_mib,
            t.bytes >> 20,
            t.saved_from,
            t.description.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{SandboxRecord, SandboxState};

    fn template(state_dir: &Path, name: &str) -> TemplateRecord {
        let dir = state_dir.join("sandboxes").join(USER_TEMPLATES_DIR).join(format!("{name}-1"));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        TemplateRecord {
            name: name.into(),
            owner: "client:a".into(),
            description: None,
            base: "default".into(),
            saved_from: "sb-1".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 64,
            bytes: 0,
            created_ms: 1,
            engine: "test".into(),
            engine_state: serde_json::json!({ "dir": dir }),
            spec_hash: None,
            env: Default::default(),
            settings: Default::default(),
        }
    }

    fn sandbox_from(id: &str, template: &str) -> SandboxRecord {
        SandboxRecord { state: SandboxState::Running, template: template.into(), ..crate::registry::tests::record(id) }
    }

    #[test]
    fn a_used_template_is_removed_only_with_force_and_its_files_go() {
        let state = tempfile::tempdir().unwrap();
        let registry = Registry::open(state.path()).unwrap();
        let t = template(state.path(), "ml");
        registry.insert_template(&t).unwrap();
        registry.insert(&sandbox_from("sb-2", "ml"), "created").unwrap();
        let err = remove(&registry, state.path(), "ml", false).unwrap_err().to_string();
        assert!(err.contains("in use by sb-2") && err.contains("--force"), "{err}");
        assert!(registry.template("ml").unwrap().is_some(), "refused: still there");
        remove(&registry, state.path(), "ml", true).unwrap();
        assert!(registry.template("ml").unwrap().is_none());
        let dir = PathBuf::from(t.engine_state["dir"].as_str().unwrap());
        assert!(!dir.exists(), "its files are deleted");
        let err = remove(&registry, state.path(), "ml", true).unwrap_err().to_string();
        assert!(err.contains("no saved template \"ml\"; the saved ones are: none"), "{err}");
    }

    #[test]
    fn files_outside_the_state_directory_are_never_deleted() {
        let state = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let registry = Registry::open(state.path()).unwrap();
        let mut t = template(state.path(), "odd");
        let outside = elsewhere.path().join(USER_TEMPLATES_DIR).join("odd-1");
        std::fs::create_dir_all(&outside).unwrap();
        t.engine_state = serde_json::json!({ "dir": outside });
        registry.insert_template(&t).unwrap();
        remove(&registry, state.path(), "odd", false).unwrap();
        assert!(outside.exists());
    }
}
