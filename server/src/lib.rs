//! capsule: an MCP server that gives LLM agents disposable Linux microVMs.
//!
//! The binary (`main.rs`) is a thin CLI over the modules here.

pub mod doctor;
pub mod image;
pub mod serve;
pub mod worker;
