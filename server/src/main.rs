//! The `capsule` command line: the only place `anyhow` is used.

fn main() -> anyhow::Result<()> {
    Ok(())
}
