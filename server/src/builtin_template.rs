//! The built-in template `default`, declared by `templates/default.toml` in the format of every
//! template spec ([`crate::template_build::TemplateSpec`]).
//!
//! It is the base of every other template, so it is not built in a sandbox: the image build
//! installs its `apt` packages into the guest's Debian tree ([`crate::image`]), the KVM engine
//! runs its `warm` code before it saves the template ([`crate::engine::kvm`]), and the tools
//! describe it with its `description`. It may use those fields and `name` only; the tests below
//! check that, so the spec compiled in always parses.

use std::sync::OnceLock;

use crate::template_build::TemplateSpec;

/// The spec, as the repository holds it.
pub const DEFAULT_SPEC_TOML: &str = include_str!("../../templates/default.toml");

/// The parsed spec.
pub fn spec() -> &'static TemplateSpec {
    static SPEC: OnceLock<TemplateSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        // The file is compiled in and checked by `the_built_in_spec_parses_and_uses_only_its_fields`.
        toml::from_str(DEFAULT_SPEC_TOML).expect("templates/default.toml is a template spec")
    })
}

/// The Debian packages the image installs.
pub fn apt_packages() -> impl Iterator<Item = &'static str> {
    spec().apt.iter().map(String::as_str)
}

/// The Python the template runs before it is saved.
pub fn warm_code() -> &'static str {
    spec().warm.as_deref().unwrap_or_default()
}

/// What the template holds, for the model.
pub fn description() -> &'static str {
    spec().description.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::admission::DEFAULT_TEMPLATE;

    #[test]
    fn the_built_in_spec_parses_and_uses_only_its_fields() {
        let spec = spec();
        assert_eq!(spec.name, DEFAULT_TEMPLATE);
        assert!(!description().is_empty() && !warm_code().trim().is_empty());
        assert!(apt_packages().any(|p| p == "python3") && apt_packages().any(|p| p == "nodejs"));
        let only_its_fields = TemplateSpec {
            name: spec.name.clone(),
            description: spec.description.clone(),
            apt: spec.apt.clone(),
            warm: spec.warm.clone(),
            ..toml::from_str("name = \"x\"").unwrap()
        };
        assert_eq!(*spec, only_its_fields, "the image build and the engine read no other field");
        let renamed = TemplateSpec { name: "default-check".into(), ..spec.clone() };
        crate::template_build::validate(&renamed, std::path::Path::new(".")).expect("its packages and code are valid");
    }
}
