//! capsule: an MCP server that gives LLM agents disposable Linux microVMs.
//!
//! The binary (`main.rs`) is a thin CLI over the modules here.

pub mod builtin_template;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod engine;
pub mod guest;
pub mod image;
pub mod mcp;
pub mod network;
pub mod ps;
pub mod record;
pub mod registry;
pub mod sandbox;
pub mod serve;
pub mod settings;
pub mod template_build;
pub mod template_cli;
pub mod worker;
