//! The `capsule` command line. This is the binary edge: the only place `anyhow` is used.
//! Each subcommand's arguments and logic live in the library module that owns it.

use clap::{Parser, Subcommand};

/// capsule: disposable, snapshot-able Linux microVMs for LLM agents, served over MCP.
#[derive(Debug, Parser)]
#[command(name = "capsule", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MCP over stdio (default) or streamable HTTP, through the host's capsule daemon
    /// (started when none runs; every client on the host shares it).
    Serve(capsule::serve::ServeArgs),
    /// List every sandbox on this host: owner, state, memory, CPU and age.
    Ps(capsule::settings::SettingsArgs),
    /// Pause every running sandbox and stop the host's capsule daemon.
    Shutdown(capsule::settings::SettingsArgs),
    /// Build or inspect the guest image (kernel + root filesystem).
    Image {
        #[command(subcommand)]
        command: capsule::image::ImageCommand,
    },
    /// List, show, build (from a TOML spec) or remove saved templates.
    Template {
        #[command(subcommand)]
        command: capsule::template_cli::TemplateCommand,
    },
    /// Report what this host can run (KVM access, PVM or hardware virtualization) and why not.
    Doctor(capsule::doctor::DoctorArgs),
    /// Run the daemon that owns a state directory in the foreground (`capsule serve` starts it).
    Daemon(capsule::daemon::DaemonArgs),
    /// Internal: run one VM in this process, controlled over a Unix socket.
    #[command(hide = true)]
    Worker(capsule::worker::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => capsule::serve::run(args)?,
        Command::Ps(settings) => {
            let state_dir = capsule::serve::state_dir(&settings)?;
            let rows = match capsule::daemon::client::ps(&state_dir)? {
                Some(rows) => rows,
                None => capsule::ps::rows_from_registry(&state_dir)?,
            };
            print!("{}", capsule::ps::render(&rows));
        }
        Command::Shutdown(settings) => {
            let state_dir = capsule::serve::state_dir(&settings)?;
            match capsule::daemon::client::shutdown(&state_dir) {
                Ok(pid) => eprintln!("capsule: the daemon (pid {pid}) paused its sandboxes and stopped"),
                Err(capsule::daemon::client::ClientError::NotRunning(_)) => {
                    eprintln!("capsule: no daemon is running for {}", state_dir.display())
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Image { command } => capsule::image::run(command)?,
        Command::Template { command } => print!("{}", capsule::template_cli::run(command)?),
        Command::Doctor(args) => capsule::doctor::run(args)?,
        Command::Daemon(args) => capsule::daemon::run(args)?,
        Command::Worker(args) => capsule::worker::run(args)?,
    }
    Ok(())
}
