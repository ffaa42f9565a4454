//! `capsule doctor`: prints what this host can run (capsule_vmm::doctor does the probing).
//! It exits non-zero when the host cannot run VMs, so scripts can gate on it.

/// Arguments of `capsule doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Errors of `capsule doctor`.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// The host cannot run VMs; the report said why.
    #[error("this host cannot run capsule VMs (see the report above)")]
    CannotRunVms,
    /// The report could not be encoded.
    #[error("encoding the report as JSON")]
    Json(#[source] serde_json::Error),
}

/// Runs `capsule doctor`.
pub fn run(args: DoctorArgs) -> Result<(), DoctorError> {
    let report = capsule_vmm::doctor::probe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(DoctorError::Json)?);
    } else {
        print!("{}", report.render_text());
    }
    if report.can_run_vms {
        Ok(())
    } else {
        Err(DoctorError::CannotRunVms)
    }
}

/// The environment variable that turns the test suite's "no KVM here" or "no guest image"
/// skips into failures (`.ci/run` sets it where `capsule doctor` says VMs can run).
pub const REQUIRE_KVM_ENV: &str = "CAPSULE_REQUIRE_KVM";

/// For tests that need KVM and a guest image: prints `SKIP: <why>` and returns, or panics with
/// `why` when [`REQUIRE_KVM_ENV`] is `1`.
pub fn skip_without_kvm(why: &str) {
    if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_KVM_ENV}=1, but this test cannot run: {why}");
    }
    eprintln!("SKIP: {why}");
}
