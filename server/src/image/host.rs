//! What the build host offers: its kind of virtualization (which picks the
//! kernel flavour), its configured Debian mirror, and the external tools the
//! build needs, each with the exact `apt-get install` that provides it.
//!
//! Read-only: this module inspects the host and never changes it.

use std::path::{Path, PathBuf};

/// Mirror used when none is configured and `CAPSULE_DEBIAN_MIRROR` is unset.
pub const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable that overrides the Debian mirror.
pub const MIRROR_ENV: &str = "CAPSULE_DEBIAN_MIRROR";
/// Directories searched for tools besides `$PATH` (debootstrap lives in sbin).
const EXTRA_TOOL_DIRS: [&str; 4] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"];

/// Errors about the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A tool the build needs is not installed.
    #[error("`{tool}` is not installed; install it with `apt-get install {package}`")]
    MissingTool {
        /// The tool (or file) that is missing.
        tool: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A step needs root.
    #[error("{step} needs root (debootstrap and chroot); run it once as root, keeping your cache: `sudo CAPSULE_CACHE_DIR=$HOME/.cache/capsule capsule image build`")]
    NeedsRoot {
        /// The step.
        step: &'static str,
    },
}

/// The host's virtualization, as far as the guest kernel is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostVirt {
    /// KVM is the PVM fork (`kvm_pvm`): only a PVM-patched guest runs at speed.
    Pvm,
    /// VT-x or AMD-V: a standard guest runs at speed.
    Hardware,
    /// Neither was found.
    None,
}

/// Detects the host's virtualization: a PVM KVM ([`capsule_vmm::host::is_pvm`]) means PVM, a
/// `vmx` or `svm` CPU flag means hardware virtualization.
pub fn detect_virt() -> HostVirt {
    if capsule_vmm::host::is_pvm() {
        return HostVirt::Pvm;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo_has_hw_virt(&cpuinfo) {
        HostVirt::Hardware
    } else {
        HostVirt::None
    }
}

fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

/// The Debian mirror to debootstrap from: `$CAPSULE_DEBIAN_MIRROR`, else the
/// first apt source of this host that serves `suite`, else Debian's default.
pub fn debian_mirror(suite: &str) -> String {
    if let Some(mirror) = std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty()) {
        return mirror;
    }
    configured_mirror(Path::new("/etc/apt"), suite).unwrap_or_else(|| DEFAULT_DEBIAN_MIRROR.to_owned())
}

/// Searches `sources.list` and `sources.list.d/*.{list,sources}` under `apt_dir`.
fn configured_mirror(apt_dir: &Path, suite: &str) -> Option<String> {
    if let Some(found) =
        std::fs::read_to_string(apt_dir.join("sources.list")).ok().and_then(|text| mirror_from_one_line(&text, suite))
    {
        return Some(found);
    }
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(apt_dir.join("sources.list.d")).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files.iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        match path.extension()?.to_str()? {
            "list" => mirror_from_one_line(&text, suite),
            "sources" => mirror_from_deb822(&text, suite),
            _ => None,
        }
    })
}

/// `deb [options] URI SUITE COMPONENTS...`
fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// Paragraphs of `Types:`, `URIs:`, `Suites:` (and optionally `Enabled:`).
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    let mut paragraphs = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            paragraphs.push(Vec::new());
        } else if !line.starts_with('#') {
            if let Some(current) = paragraphs.last_mut() {
                current.push(line);
            }
        }
    }
    paragraphs.iter().find_map(|lines| {
        let field = |name: &str| {
            lines.iter().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
        };
        if field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            return None;
        }
        let types = field("Types")?;
        let suites = field("Suites")?;
        if !types.split_whitespace().any(|t| t == "deb") || !suites.split_whitespace().any(|s| s == suite) {
            return None;
        }
        let uri = field("URIs")?.split_whitespace().next()?.to_owned();
        Some(uri.trim_end_matches('/').to_owned())
    })
}

/// Finds `tool` on `$PATH` or in the sbin directories, or says which package provides it.
pub fn require_tool(tool: &str, package: &'static str) -> Result<PathBuf, HostError> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| HostError::MissingTool { tool: tool.to_owned(), package })
}

/// Requires that a file (a header, a source tarball) exists.
pub fn require_file(path: &Path, package: &'static str) -> Result<(), HostError> {
    if path.exists() {
        Ok(())
    } else {
        Err(HostError::MissingTool { tool: path.display().to_string(), package })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Requires root for `step`.
pub fn require_root(step: &'static str) -> Result<(), HostError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(HostError::NeedsRoot { step })
    }
}

/// Parallel jobs for `make`.
pub fn build_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_decide_hardware_virtualization() {
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu svm\n"));
        assert!(!cpuinfo_has_hw_virt("flags\t\t: fpu vme sse hypervisor\n"));
        assert!(!cpuinfo_has_hw_virt("model name: vmx in a name\n"));
    }

    #[test]
    fn one_line_sources_pick_the_suite_not_its_updates() {
        let text = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                    deb http://sec.example/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(mirror_from_one_line(text, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_one_line(text, "trixie"), None);
    }

    #[test]
    fn deb822_sources_skip_disabled_and_other_suites() {
        let text = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n\
                    Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n\
                    Types: deb\n# a comment\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(mirror_from_deb822(text, "bookworm").as_deref(), Some("http://deb.example/debian"));
    }

    #[test]
    fn configured_mirror_reads_sources_list_d() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/x.sources.disabled"),
            "Types: deb\nURIs: http://disabled.example\nSuites: bookworm\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(configured_mirror(dir.path(), "bookworm").as_deref(), Some("http://deb.example/debian"));
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = require_tool("capsule-no-such-tool", "capsule-pkg").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`capsule-no-such-tool` is not installed; install it with `apt-get install capsule-pkg`"
        );
        assert!(require_tool("sh", "dash").is_ok());
    }
}
