//! The MCP tool contract of capsule: one params/result struct per tool.
//!
//! - [`tools`]: the params and result types (serde + schemars). Their doc
//!   comments are the descriptions a model reads, so they are written for a
//!   model: what the tool does, when to use it, defaults and limits.
//! - [`catalog`]: the list of tools with their MCP annotations, the JSON
//!   schemas generated from the types (checked in under `schemas/`, pinned by a
//!   golden test) and the README tool reference rendered from them.
//!
//! This crate holds the contract only: no I/O, no sandbox logic, no MCP transport.

pub mod catalog;
pub mod tools;

pub use catalog::{catalog, render_reference_markdown, tool_spec, ToolSpec};
pub use tools::*;
