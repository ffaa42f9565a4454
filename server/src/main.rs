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
    /// Serve MCP over stdio (default) or streamable HTTP.
    Serve(capsule::serve::ServeArgs),
    /// Build or inspect the guest image (kernel + root filesystem).
    Image {
        #[command(subcommand)]
        command: capsule::image::ImageCommand,
    },
    /// Report what this host can run (KVM access, PVM or hardware virtualization) and why not.
    Doctor(capsule::doctor::DoctorArgs),
    /// Internal: run one VM in this process, controlled over a Unix socket.
    #[command(hide = true)]
    Worker(capsule::worker::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => capsule::serve::run(args)?,
        Command::Image { command } => capsule::image::run(command)?,
        Command::Doctor(args) => capsule::doctor::run(args)?,
        Command::Worker(args) => capsule::worker::run(args)?,
    }
    Ok(())
}
