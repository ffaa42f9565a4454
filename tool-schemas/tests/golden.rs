//! Golden test: the generated tool schemas and the README tool reference must
//! match the files checked in under `schemas/`. Run with `UPDATE_SCHEMA=1` to
//! rewrite them after an intended contract change, and review the diff.

use std::path::PathBuf;

use capsule_tool_schemas::{catalog, render_reference_markdown};

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn check_or_update(path: PathBuf, generated: String, drift: &mut Vec<String>) {
    let update = std::env::var_os("UPDATE_SCHEMA").is_some_and(|v| v == "1");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    if on_disk == generated {
        return;
    }
    if update {
        std::fs::write(&path, &generated).expect("write golden file");
    } else {
        drift.push(path.display().to_string());
    }
}

#[test]
fn tool_schemas_match_the_checked_in_golden_files() {
    let dir = schemas_dir();
    std::fs::create_dir_all(&dir).expect("create schemas dir");
    let mut drift = Vec::new();
    let mut names = Vec::new();
    for tool in catalog() {
        let text = serde_json::to_string_pretty(&tool.definition()).expect("serialize") + "\n";
        check_or_update(dir.join(format!("{}.json", tool.name)), text, &mut drift);
        names.push(format!("{}.json", tool.name));
    }
    check_or_update(dir.join("REFERENCE.md"), render_reference_markdown(), &mut drift);
    names.push("REFERENCE.md".to_string());
    // No stale golden files for tools that no longer exist.
    for entry in std::fs::read_dir(&dir).expect("read schemas dir") {
        let name = entry.expect("dir entry").file_name().to_string_lossy().into_owned();
        if !names.contains(&name) {
            drift.push(format!("{name} (no such tool any more: delete it)"));
        }
    }
    assert!(
        drift.is_empty(),
        "tool schemas drifted from the golden files: {drift:?}\n\
         If the change is intended, run `UPDATE_SCHEMA=1 cargo test -p capsule-tool-schemas` and review the diff."
    );
}

#[test]
fn every_tool_has_a_description_annotations_and_object_schemas() {
    let tools = catalog();
    assert_eq!(tools.len(), 17);
    for tool in tools {
        assert!(tool.description().len() > 40, "{} has no real description", tool.name);
        assert_eq!(tool.input_schema().get("type"), Some(&serde_json::json!("object")), "{}", tool.name);
        assert_eq!(tool.output_schema().get("type"), Some(&serde_json::json!("object")), "{}", tool.name);
        assert!(!(tool.read_only && tool.destructive), "{} cannot be read-only and destructive", tool.name);
        let props = tool.input_schema();
        let props = props.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
        for (name, prop) in props {
            assert!(prop.get("description").is_some(), "{}.{name} has no description", tool.name);
        }
    }
}

#[test]
fn unknown_parameters_are_rejected() {
    let err = serde_json::from_value::<capsule_tool_schemas::RunCodeParams>(
        serde_json::json!({"code": "1", "langauge": "python"}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("langauge"), "{err}");
}

#[test]
fn every_schema_is_valid_json_schema_2020_12_with_only_standard_formats() {
    for tool in catalog() {
        for (which, schema) in [("input", tool.input_schema()), ("output", tool.output_schema())] {
            let schema = serde_json::Value::Object(schema);
            if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
                panic!("{} {which} schema is not valid JSON Schema 2020-12: {e}", tool.name);
            }
            // A strict validator (unknown formats are errors, as in the MCP inspector's ajv).
            let strict = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .should_validate_formats(true)
                .should_ignore_unknown_formats(false)
                .build(&schema);
            if let Err(e) = strict {
                panic!("{} {which} schema does not build in a strict validator: {e}", tool.name);
            }
        }
    }
}

#[test]
fn integer_bounds_replace_the_formats_they_stood_for() {
    let run_command = catalog().into_iter().find(|t| t.name == "run_command").expect("run_command");
    let output = serde_json::Value::Object(run_command.output_schema());
    let exit_code = &output["properties"]["exit_code"];
    assert_eq!(exit_code["minimum"], serde_json::json!(i32::MIN), "{exit_code}");
    assert_eq!(exit_code["maximum"], serde_json::json!(i32::MAX), "{exit_code}");
    assert!(exit_code.get("format").is_none(), "{exit_code}");
}
