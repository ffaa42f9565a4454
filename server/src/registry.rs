//! The registry: every sandbox and every state transition, and the templates saved from
//! sandboxes, in SQLite.
//!
//! An embedded database (`registry.sqlite3` in the state directory) with
//! numbered migrations tracked in `PRAGMA user_version`. The manager writes a
//! transition here *before* it reports it, so a restarted server finds each
//! sandbox where it was. This module stores and loads facts; it never decides
//! a transition (that is the sandbox manager's lifecycle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::record::{SandboxRecord, SandboxSettings, SandboxState, TemplateRecord};

/// The registry's file name inside the state directory.
pub const REGISTRY_FILE_NAME: &str = "registry.sqlite3";

/// Schema migrations, in order; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes and their transitions.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT,
        state TEXT NOT NULL,
        template TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        idle_timeout_ms INTEGER NOT NULL,
        env_json TEXT NOT NULL,
        is_default INTEGER NOT NULL DEFAULT 0,
        parent_id TEXT,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        paused_ms INTEGER,
        failure TEXT,
        engine TEXT NOT NULL,
        engine_state TEXT NOT NULL
    );
    CREATE TABLE transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX transitions_by_sandbox ON transitions(sandbox_id, seq);",
    // 2: per-sandbox settings (limits every command runs under), as JSON.
    "ALTER TABLE sandboxes ADD COLUMN settings_json TEXT NOT NULL DEFAULT '{}';",
    // 3: templates saved from sandboxes.
    "CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        description TEXT,
        base TEXT NOT NULL,
        saved_from TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        engine TEXT NOT NULL,
        engine_state TEXT NOT NULL
    );",
    // 4: the spec hash of templates built from a spec.
    "ALTER TABLE templates ADD COLUMN spec_hash TEXT;",
    // 5: what sandboxes made from a template start with: its environment and settings.
    "ALTER TABLE templates ADD COLUMN env_json TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE templates ADD COLUMN settings_json TEXT NOT NULL DEFAULT '{}';",
];

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("registry database error")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer capsule.
    #[error("the registry has schema version {found}, newer than this capsule knows ({known}); upgrade capsule or use another --state-dir")]
    TooNew {
        /// Version in the file.
        found: u32,
        /// Latest version this build knows.
        known: u32,
    },
    /// A stored row is corrupt.
    #[error("registry row for sandbox {id} is corrupt: {what}")]
    Corrupt {
        /// The sandbox.
        id: String,
        /// What is wrong.
        what: String,
    },
}

/// The registry handle (one connection, serialized).
#[derive(Debug)]
pub struct Registry {
    conn: Mutex<Connection>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Registry {
    /// Opens (or creates) the registry in `state_dir` and applies pending migrations.
    pub fn open(state_dir: &Path) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|source| RegistryError::StateDir { path: state_dir.to_path_buf(), source })?;
        let conn = Connection::open(state_dir.join(REGISTRY_FILE_NAME))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut registry = Registry { conn: Mutex::new(conn) };
        registry.migrate()?;
        Ok(registry)
    }

    fn migrate(&mut self) -> Result<(), RegistryError> {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as u32;
        if version > known {
            return Err(RegistryError::TooNew { found: version, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as u32)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version in use.
    pub fn schema_version(&self) -> Result<u32, RegistryError> {
        let conn = self.lock();
        Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts a new sandbox and its first transition (into its current state).
    pub fn insert(&self, r: &SandboxRecord, reason: &str) -> Result<(), RegistryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO sandboxes (id, owner, name, state, template, vcpus, memory_mib, disk_mib,
                idle_timeout_ms, env_json, is_default, parent_id, created_ms, updated_ms, paused_ms,
                failure, engine, engine_state, settings_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            params![
                r.id,
                r.owner,
                r.name,
                r.state.as_str(),
                r.template,
                r.vcpus,
                r.memory_mib,
                r.disk_mib,
                r.idle_timeout_ms as i64,
                serde_json::to_string(&r.env).unwrap_or_else(|_| "{}".into()),
                r.is_default,
                r.parent_id,
                r.created_ms as i64,
                r.updated_ms as i64,
                r.paused_ms.map(|v| v as i64),
                r.failure,
                r.engine,
                r.engine_state.to_string(),
                serde_json::to_string(&r.settings).unwrap_or_else(|_| "{}".into()),
            ],
        )?;
        tx.execute(
            "INSERT INTO transitions (sandbox_id, from_state, to_state, at_ms, reason) VALUES (?1, NULL, ?2, ?3, ?4)",
            params![r.id, r.state.as_str(), r.updated_ms as i64, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a transition of `r` (already updated in memory) from `from`, atomically
    /// with the sandbox's new row.
    pub fn record_transition(&self, r: &SandboxRecord, from: SandboxState, reason: &str) -> Result<(), RegistryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE sandboxes SET state = ?2, updated_ms = ?3, paused_ms = ?4, failure = ?5,
                engine_state = ?6, is_default = ?7 WHERE id = ?1",
            params![
                r.id,
                r.state.as_str(),
                r.updated_ms as i64,
                r.paused_ms.map(|v| v as i64),
                r.failure,
                r.engine_state.to_string(),
                r.is_default,
            ],
        )?;
        tx.execute(
            "INSERT INTO transitions (sandbox_id, from_state, to_state, at_ms, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![r.id, from.as_str(), r.state.as_str(), r.updated_ms as i64, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Updates whether a sandbox is its owner's default.
    pub fn set_default(&self, id: &str, is_default: bool) -> Result<(), RegistryError> {
        self.lock().execute("UPDATE sandboxes SET is_default = ?2 WHERE id = ?1", params![id, is_default])?;
        Ok(())
    }

    /// Every sandbox that is not deleted.
    pub fn load_live(&self) -> Result<Vec<SandboxRecord>, RegistryError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, owner, name, state, template, vcpus, memory_mib, disk_mib, idle_timeout_ms,
                env_json, is_default, parent_id, created_ms, updated_ms, paused_ms, failure, engine,
                engine_state, settings_json
             FROM sandboxes WHERE state != 'deleted' ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, u32>(5)?,
                row.get::<_, u32>(6)?,
                row.get::<_, u32>(7)?,
                row.get::<_, i64>(8)?,
                row.get::<_, String>(9)?,
                row.get::<_, bool>(10)?,
                row.get::<_, Option<String>>(11)?,
                row.get::<_, i64>(12)?,
                row.get::<_, i64>(13)?,
                row.get::<_, Option<i64>>(14)?,
                row.get::<_, Option<String>>(15)?,
                row.get::<_, String>(16)?,
                row.get::<_, String>(17)?,
                row.get::<_, String>(18)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                owner,
                name,
                state,
                template,
                vcpus,
                memory_mib,
                disk_mib,
                idle,
                env,
                is_default,
                parent_id,
                created,
                updated,
                paused,
                failure,
                engine,
                engine_state,
                settings,
            ) = row?;
            let corrupt = |what: String| RegistryError::Corrupt { id: id.clone(), what };
            let state = SandboxState::parse(&state).ok_or_else(|| corrupt(format!("unknown state {state:?}")))?;
            let env: BTreeMap<String, String> = serde_json::from_str(&env).map_err(|e| corrupt(format!("env: {e}")))?;
            let engine_state: serde_json::Value =
                serde_json::from_str(&engine_state).map_err(|e| corrupt(format!("engine state: {e}")))?;
            let settings = serde_json::from_str(&settings).map_err(|e| corrupt(format!("settings: {e}")))?;
            out.push(SandboxRecord {
                id,
                owner,
                name,
                state,
                template,
                vcpus,
                memory_mib,
                disk_mib,
                idle_timeout_ms: idle.max(0) as u64,
                env,
                settings,
                is_default,
                parent_id,
                created_ms: created.max(0) as u64,
                updated_ms: updated.max(0) as u64,
                paused_ms: paused.map(|v| v.max(0) as u64),
                failure,
                engine,
                engine_state,
            });
        }
        Ok(out)
    }

    /// The recorded transitions of a sandbox, oldest first: `(from, to, reason)`.
    pub fn transitions(&self, id: &str) -> Result<Vec<(Option<String>, String, String)>, RegistryError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT from_state, to_state, reason FROM transitions WHERE sandbox_id = ?1 ORDER BY seq")?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The state of one sandbox as stored, if it exists.
    pub fn stored_state(&self, id: &str) -> Result<Option<String>, RegistryError> {
        let conn = self.lock();
        Ok(conn.query_row("SELECT state FROM sandboxes WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    /// Records a new template; `false` (nothing written) when one of that name exists.
    pub fn insert_template(&self, t: &TemplateRecord) -> Result<bool, RegistryError> {
        let inserted = self.lock().execute(
            "INSERT OR IGNORE INTO templates (name, owner, description, base, saved_from, vcpus, memory_mib,
                disk_mib, bytes, created_ms, engine, engine_state, env_json, settings_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                t.name,
                t.owner,
                t.description,
                t.base,
                t.saved_from,
                t.vcpus,
                t.memory_mib,
                t.disk_mib,
                t.bytes as i64,
                t.created_ms as i64,
                t.engine,
                t.engine_state.to_string(),
                serde_json::to_string(&t.env).unwrap_or_else(|_| "{}".into()),
                serde_json::to_string(&t.settings).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Every saved template, by name.
    pub fn templates(&self) -> Result<Vec<TemplateRecord>, RegistryError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT name, owner, description, base, saved_from, vcpus, memory_mib, disk_mib, bytes, created_ms,
                engine, engine_state, spec_hash, env_json, settings_json
             FROM templates ORDER BY name",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                TemplateRecord {
                    name: row.get(0)?,
                    owner: row.get(1)?,
                    description: row.get(2)?,
                    base: row.get(3)?,
                    saved_from: row.get(4)?,
                    vcpus: row.get(5)?,
                    memory_mib: row.get(6)?,
                    disk_mib: row.get(7)?,
                    bytes: row.get::<_, i64>(8)?.max(0) as u64,
                    created_ms: row.get::<_, i64>(9)?.max(0) as u64,
                    engine: row.get(10)?,
                    engine_state: serde_json::Value::Null,
                    spec_hash: row.get(12)?,
                    env: BTreeMap::new(),
                    settings: SandboxSettings::default(),
                },
                [row.get::<_, String>(11)?, row.get::<_, String>(13)?, row.get::<_, String>(14)?],
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut template, [state, env, settings]) = row?;
            let corrupt = |what: &str, e: serde_json::Error| RegistryError::Corrupt {
                id: format!("template {}", template.name),
                what: format!("{what}: {e}"),
            };
            template.engine_state = serde_json::from_str(&state).map_err(|e| corrupt("engine state", e))?;
            template.env = serde_json::from_str(&env).map_err(|e| corrupt("environment", e))?;
            template.settings = serde_json::from_str(&settings).map_err(|e| corrupt("settings", e))?;
            out.push(template);
        }
        Ok(out)
    }

    /// The saved template `name`, if there is one.
    pub fn template(&self, name: &str) -> Result<Option<TemplateRecord>, RegistryError> {
        Ok(self.templates()?.into_iter().find(|t| t.name == name))
    }

    /// Marks template `name` as built from a spec with `spec_hash`, and as the host's (every
    /// client may use it).
    pub fn mark_template_built(&self, name: &str, spec_hash: &str) -> Result<(), RegistryError> {
        self.lock().execute(
            "UPDATE templates SET spec_hash = ?2, owner = ?3 WHERE name = ?1",
            params![name, spec_hash, crate::record::HOST_TEMPLATE_OWNER],
        )?;
        Ok(())
    }

    /// Forgets the saved template `name`; whether there was one.
    pub fn delete_template(&self, name: &str) -> Result<bool, RegistryError> {
        Ok(self.lock().execute("DELETE FROM templates WHERE name = ?1", [name])? == 1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A sandbox record as tests store it.
    pub(crate) fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            owner: "o".into(),
            name: Some("n".into()),
            state: SandboxState::Creating,
            template: "default".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            idle_timeout_ms: 1000,
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            settings: SandboxSettings { pids_max: Some(64), network: None },
            is_default: true,
            parent_id: None,
            created_ms: 1,
            updated_ms: 1,
            paused_ms: None,
            failure: None,
            engine: "test".into(),
            engine_state: serde_json::json!({"pid": 7}),
        }
    }

    #[test]
    fn transitions_are_recorded_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let reg = Registry::open(dir.path()).unwrap();
            let mut r = record("sb-1");
            reg.insert(&r, "created").unwrap();
            r.state = SandboxState::Running;
            reg.record_transition(&r, SandboxState::Creating, "booted").unwrap();
            r.state = SandboxState::Paused;
            r.paused_ms = Some(5);
            reg.record_transition(&r, SandboxState::Running, "idle").unwrap();
        }
        let reg = Registry::open(dir.path()).unwrap();
        assert_eq!(reg.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let live = reg.load_live().unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].state, SandboxState::Paused);
        assert_eq!(live[0].paused_ms, Some(5));
        assert_eq!(live[0].env.get("A").map(String::as_str), Some("1"));
        assert_eq!(live[0].engine_state["pid"], 7);
        let t = reg.transitions("sb-1").unwrap();
        let states: Vec<&str> = t.iter().map(|(_, to, _)| to.as_str()).collect();
        assert_eq!(states, ["creating", "running", "paused"]);
        assert_eq!(t[2].2, "idle");
    }

    fn template(name: &str) -> TemplateRecord {
        TemplateRecord {
            name: name.into(),
            owner: "client:a".into(),
            description: Some("numpy warmed".into()),
            base: "default".into(),
            saved_from: "sb-1".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 64,
            bytes: 4096,
            created_ms: 9,
            engine: "kvm".into(),
            engine_state: serde_json::json!({"dir": "/s/.user-templates/t"}),
            spec_hash: None,
            env: BTreeMap::from([("MPLBACKEND".to_string(), "Agg".to_string())]),
            settings: SandboxSettings { pids_max: Some(32), network: None },
        }
    }

    #[test]
    fn templates_are_kept_by_name_survive_reopen_and_are_deleted_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let reg = Registry::open(dir.path()).unwrap();
            assert!(reg.insert_template(&template("ml")).unwrap());
            assert!(!reg.insert_template(&template("ml")).unwrap(), "a second of the same name is refused");
            assert!(reg.insert_template(&template("base")).unwrap());
        }
        let reg = Registry::open(dir.path()).unwrap();
        let names: Vec<String> = reg.templates().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["base", "ml"]);
        assert_eq!(reg.template("ml").unwrap(), Some(template("ml")));
        reg.mark_template_built("ml", "abc").unwrap();
        let built = reg.template("ml").unwrap().unwrap();
        assert_eq!((built.spec_hash.as_deref(), built.owner.as_str()), (Some("abc"), "host"));
        assert!(reg.delete_template("ml").unwrap());
        assert!(!reg.delete_template("ml").unwrap());
        assert_eq!(reg.template("ml").unwrap(), None);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Registry::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(REGISTRY_FILE_NAME)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(Registry::open(dir.path()), Err(RegistryError::TooNew { found: 99, .. })));
    }
}
