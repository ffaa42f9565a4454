//! The tool catalogue: names, MCP annotations and generated JSON schemas.
//!
//! The server lists exactly these tools, so the checked-in `schemas/*.json`
//! are what clients see. A tool's description is the doc comment of its params
//! struct (moved out of the input schema, as MCP wants it at the tool level).
//!
//! Schemas are JSON Schema 2020-12: inputs describe what deserializes, outputs
//! what serializes (the `structuredContent` of each result).

use schemars::generate::SchemaSettings;
use schemars::transform::{transform_subschemas, RestrictFormats};
use schemars::{JsonSchema, Schema};
use serde_json::{json, Map, Value};

use crate::tools::*;

/// One tool of the contract.
#[derive(Debug, Clone, Copy)]
pub struct ToolSpec {
    /// The MCP tool name.
    pub name: &'static str,
    /// A short human title.
    pub title: &'static str,
    /// Annotation: the tool does not change its environment.
    pub read_only: bool,
    /// Annotation: the tool may destroy state.
    pub destructive: bool,
    /// Annotation: calling it again with the same arguments has no further effect.
    pub idempotent: bool,
    /// Annotation: the tool reaches outside a closed world (sandboxes have no network by default).
    pub open_world: bool,
    input: fn() -> Value,
    output: fn() -> Value,
}

impl ToolSpec {
    /// The input schema, without its root title and description.
    pub fn input_schema(&self) -> Map<String, Value> {
        strip_root((self.input)())
    }

    /// The output schema (of `structuredContent`), without its root title and description.
    pub fn output_schema(&self) -> Map<String, Value> {
        strip_root((self.output)())
    }

    /// The tool description: the doc comment of its params struct.
    pub fn description(&self) -> String {
        match (self.input)().get("description") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        }
    }

    /// The MCP annotations object.
    pub fn annotations(&self) -> Value {
        json!({
            "title": self.title,
            "readOnlyHint": self.read_only,
            "destructiveHint": self.destructive,
            "idempotentHint": self.idempotent,
            "openWorldHint": self.open_world,
        })
    }

    /// The whole MCP tool definition, as `tools/list` returns it and as the golden file holds it.
    pub fn definition(&self) -> Value {
        json!({
            "name": self.name,
            "title": self.title,
            "description": self.description(),
            "annotations": self.annotations(),
            "inputSchema": Value::Object(self.input_schema()),
            "outputSchema": Value::Object(self.output_schema()),
        })
    }
}

/// Schema settings for the contract: JSON Schema 2020-12 with only its standard `format`
/// values. schemars marks Rust integers with formats such as `uint32` that strict validators
/// reject as unknown; each becomes the bounds it stands for, where JSON numbers can hold them.
fn settings() -> SchemaSettings {
    SchemaSettings::draft2020_12().with_transform(integer_bounds).with_transform(RestrictFormats::default())
}

/// Replaces a non-standard integer `format` by `minimum`/`maximum` (64-bit bounds are left out:
/// they exceed what a JSON number holds exactly), in `schema` and every subschema.
fn integer_bounds(schema: &mut Schema) {
    transform_subschemas(&mut integer_bounds, schema);
    let Some(object) = schema.as_object_mut() else { return };
    let bounds: Option<(i64, i64)> = match object.get("format").and_then(Value::as_str) {
        Some("uint8") => Some((0, i64::from(u8::MAX))),
        Some("uint16") => Some((0, i64::from(u16::MAX))),
        Some("uint32") => Some((0, i64::from(u32::MAX))),
        Some("int8") => Some((i64::from(i8::MIN), i64::from(i8::MAX))),
        Some("int16") => Some((i64::from(i16::MIN), i64::from(i16::MAX))),
        Some("int32") => Some((i64::from(i32::MIN), i64::from(i32::MAX))),
        _ => None,
    };
    if let Some((min, max)) = bounds {
        object.entry("minimum").or_insert(json!(min));
        object.entry("maximum").or_insert(json!(max));
    }
}

fn input_schema_of<T: JsonSchema>() -> Value {
    settings().into_generator().into_root_schema_for::<T>().to_value()
}

fn output_schema_of<T: JsonSchema>() -> Value {
    settings().for_serialize().into_generator().into_root_schema_for::<T>().to_value()
}

fn strip_root(value: Value) -> Map<String, Value> {
    let mut map = match value {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    map.remove("title");
    map.remove("description");
    map
}

macro_rules! tool {
    ($name:literal, $title:literal, ro = $ro:literal, destructive = $d:literal, idempotent = $i:literal, $params:ty => $result:ty) => {
        ToolSpec {
            name: $name,
            title: $title,
            read_only: $ro,
            destructive: $d,
            idempotent: $i,
            open_world: false,
            input: input_schema_of::<$params>,
            output: output_schema_of::<$result>,
        }
    };
}

/// Every tool, in the order `tools/list` returns them.
pub fn catalog() -> Vec<ToolSpec> {
    vec![
        tool!("run_code", "Run code", ro = false, destructive = false, idempotent = false,
            RunCodeParams => RunCodeResult),
        tool!("run_command", "Run a shell command", ro = false, destructive = true, idempotent = false,
            RunCommandParams => RunCommandResult),
        tool!("read_process", "Read background process output", ro = true, destructive = false, idempotent = true,
            ReadProcessParams => ReadProcessResult),
        tool!("kill_process", "Kill a process", ro = false, destructive = true, idempotent = true,
            KillProcessParams => KillProcessResult),
        tool!("write_process", "Send input to a process", ro = false, destructive = false, idempotent = false,
            WriteProcessParams => WriteProcessResult),
        tool!("write_file", "Write a file", ro = false, destructive = true, idempotent = false,
            WriteFileParams => WriteFileResult),
        tool!("read_file", "Read a file", ro = true, destructive = false, idempotent = true,
            ReadFileParams => ReadFileResult),
        tool!("list_files", "List files", ro = true, destructive = false, idempotent = true,
            ListFilesParams => ListFilesResult),
        tool!("create_sandbox", "Create a sandbox", ro = false, destructive = false, idempotent = false,
            CreateSandboxParams => CreateSandboxResult),
        tool!("list_sandboxes", "List sandboxes", ro = true, destructive = false, idempotent = true,
            ListSandboxesParams => ListSandboxesResult),
        tool!("pause", "Pause a sandbox", ro = false, destructive = false, idempotent = true,
            PauseSandboxParams => SandboxResult),
        tool!("resume", "Resume a sandbox", ro = false, destructive = false, idempotent = true,
            ResumeSandboxParams => SandboxResult),
        tool!("fork", "Fork a sandbox", ro = false, destructive = false, idempotent = false,
            ForkSandboxParams => ForkSandboxResult),
        tool!("restart_sandbox", "Restart a sandbox", ro = false, destructive = true, idempotent = false,
            RestartSandboxParams => RestartSandboxResult),
        tool!("kill_sandbox", "Delete a sandbox", ro = false, destructive = true, idempotent = true,
            KillSandboxParams => SandboxResult),
        tool!("save_template", "Save a sandbox as a template", ro = false, destructive = false, idempotent = false,
            SaveTemplateParams => SaveTemplateResult),
        tool!("list_templates", "List templates", ro = true, destructive = false, idempotent = true,
            ListTemplatesParams => ListTemplatesResult),
    ]
}

/// The spec of one tool, by name.
pub fn tool_spec(name: &str) -> Option<ToolSpec> {
    catalog().into_iter().find(|t| t.name == name)
}

/// Renders the README tool reference (markdown) from the catalogue.
pub fn render_reference_markdown() -> String {
    let mut out = String::from("## Tools\n\n");
    out.push_str("| tool | what it does | read-only | destructive | idempotent |\n");
    out.push_str("|---|---|---|---|---|\n");
    for tool in catalog() {
        let description = tool.description().replace('\n', " ");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            tool.name,
            first_sentence(&description),
            yes_no(tool.read_only),
            yes_no(tool.destructive),
            yes_no(tool.idempotent)
        ));
    }
    for tool in catalog() {
        out.push_str(&format!("\n### `{}`: {}\n\n", tool.name, tool.title));
        out.push_str(&tool.description().replace('\n', " "));
        out.push_str("\n\n");
        let schema = tool.input_schema();
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match schema.get("properties").and_then(Value::as_object) {
            Some(props) if !props.is_empty() => {
                out.push_str("| parameter | type | required | description |\n|---|---|---|---|\n");
                for (name, prop) in props {
                    out.push_str(&format!(
                        "| `{}` | {} | {} | {} |\n",
                        name,
                        type_name(prop),
                        yes_no(required.contains(&name.as_str())),
                        prop.get("description").and_then(Value::as_str).unwrap_or("").replace('\n', " ")
                    ));
                }
            }
            _ => out.push_str("No parameters.\n"),
        }
    }
    out
}

/// The first sentence of a description: up to the first ". " followed by a capital letter.
fn first_sentence(text: &str) -> &str {
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices(". ") {
        if bytes.get(i + 2).is_some_and(u8::is_ascii_uppercase) {
            return &text[..=i];
        }
    }
    text
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A short type name for a property schema, for the reference table.
fn type_name(prop: &Value) -> String {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().unwrap_or(r).to_string();
    }
    if let Some(any) = prop.get("anyOf").and_then(Value::as_array) {
        let names: Vec<String> = any.iter().map(type_name).filter(|n| n != "null").collect();
        return names.join(" or ");
    }
    match prop.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect::<Vec<_>>().join(" or ")
        }
        _ => "any".to_string(),
    }
}
