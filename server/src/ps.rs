//! `capsule ps`: every sandbox on this host for a human: owner, state, memory, CPU and age, with
//! the host process that runs it. It asks the daemon; with no daemon running it reads the
//! registry (then nothing is running, and no process is shown).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::record::SandboxRecord;
use crate::registry::{now_ms, Registry};
use crate::sandbox::Manager;

/// One sandbox as `capsule ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsRow {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Its state.
    pub state: String,
    /// Memory it was given, in MiB.
    pub memory_mib: u32,
    /// The host process that runs it, while one does.
    pub pid: Option<u32>,
    /// That process's proportional set size (its share of host memory), in KiB.
    pub pss_kib: Option<u64>,
    /// CPU time that process used, in milliseconds.
    pub cpu_ms: Option<u64>,
    /// Age, in seconds.
    pub age_s: u64,
}

/// The rows of every sandbox of `manager`.
pub fn rows(manager: &Manager) -> Vec<PsRow> {
    manager.processes().into_iter().map(|(record, pid)| row(&record, pid)).collect()
}

/// The rows of the sandboxes recorded in the registry of `state_dir` (no daemon running).
pub fn rows_from_registry(state_dir: &Path) -> Result<Vec<PsRow>, crate::registry::RegistryError> {
    let registry = Registry::open(state_dir)?;
    Ok(registry.load_live()?.iter().map(|record| row(record, None)).collect())
}

fn row(record: &SandboxRecord, pid: Option<u32>) -> PsRow {
    PsRow {
        id: record.id.clone(),
        owner: record.owner.clone(),
        state: record.state.as_str().to_string(),
        memory_mib: record.memory_mib,
        pid,
        pss_kib: pid.and_then(pss_kib),
        cpu_ms: pid.and_then(cpu_ms),
        age_s: now_ms().saturating_sub(record.created_ms) / 1000,
    }
}

/// The `Pss:` line of `/proc/PID/smaps_rollup`, in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of `pid` (fields 14 and 15 of `/proc/PID/stat`), in milliseconds.
fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf(3) takes a plain integer.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0)?;
    Some((utime + stime) * 1000 / ticks)
}

/// The rows as a table.
pub fn render(rows: &[PsRow]) -> String {
    let mut out = format!(
        "{:<16} {:<28} {:<9} {:>7} {:>8} {:>9} {:>9} {:>8}\n",
        "SANDBOX", "OWNER", "STATE", "MEM", "PID", "PSS", "CPU", "AGE"
    );
    for r in rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<16} {:<28} {:<9} {:>6}M {:>8} {:>9} {:>9} {:>8}\n",
            r.id,
            truncate(&r.owner, 28),
            r.state,
            r.memory_mib,
            opt(r.pid.map(|p| p.to_string())),
            opt(r.pss_kib.map(|k| format!("{}M", k / 1024))),
            opt(r.cpu_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0))),
            age(r.age_s),
        ));
    }
    if rows.is_empty() {
        out.push_str("(no sandboxes)\n");
    }
    out
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(chars - 1).collect();
    cut.push('…');
    cut
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let me = std::process::id();
        assert!(pss_kib(me).is_some_and(|k| k > 0));
        assert!(cpu_ms(me).is_some());
        assert_eq!(pss_kib(u32::MAX), None);
    }

    #[test]
    fn the_table_names_each_column_and_shortens_long_owners() {
        let row = PsRow {
            id: "sb-0123456789ab".into(),
            owner: "client:a-very-long-client-name-that-goes-on".into(),
            state: "running".into(),
            memory_mib: 512,
            pid: Some(42),
            pss_kib: Some(40 * 1024),
            cpu_ms: Some(1500),
            age_s: 7300,
        };
        let table = render(&[row]);
        assert!(table.starts_with("SANDBOX"), "{table}");
        assert!(
            table.contains("sb-0123456789ab")
                && table.contains("40M")
                && table.contains("1.5s")
                && table.contains("2h"),
            "{table}"
        );
        assert!(table.contains('…'), "{table}");
        assert!(render(&[]).contains("(no sandboxes)"));
    }
}
