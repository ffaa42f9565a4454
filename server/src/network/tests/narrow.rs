//! Narrowing a sandbox's request against the server's ceiling: every ceiling × request mode,
//! rules inside rules, and the errors a model reads.

use capsule_tool_schemas::{NetworkMode, NetworkRequest};

use crate::network::policy::{narrow, EffectivePolicy, NetworkConfig, NetworkPolicy, PolicyError};

fn strings(rules: &[&str]) -> Vec<String> {
    rules.iter().map(|s| s.to_string()).collect()
}

fn ceiling(mode: NetworkMode, allow: &[&str], deny: &[&str]) -> NetworkPolicy {
    NetworkPolicy::new(mode, &strings(allow), &strings(deny)).expect("a valid ceiling")
}

fn request(mode: NetworkMode, allow: &[&str], deny: &[&str]) -> NetworkRequest {
    NetworkRequest { mode, allow: strings(allow), deny: strings(deny) }
}

fn message(result: Result<EffectivePolicy, PolicyError>) -> String {
    result.expect_err("refused").to_string()
}

use NetworkMode::{Allowlist, None as NoNet, Public};

#[test]
fn none_is_always_allowed() {
    for c in [ceiling(Public, &[], &[]), ceiling(NoNet, &[], &[]), ceiling(Allowlist, &["a.com"], &[])] {
        let effective = narrow(&c, &request(NoNet, &[], &["x.com"])).expect("none fits any ceiling");
        assert_eq!(effective.mode(), NoNet);
        assert_eq!(effective.server, c);
    }
}

#[test]
fn a_none_ceiling_refuses_every_network() {
    let c = ceiling(NoNet, &[], &[]);
    for mode in [Public, Allowlist] {
        let got = message(narrow(&c, &request(mode, &[], &[])));
        assert_eq!(got, format!("network: this server allows no network; the request asked for {}", mode.as_str()));
    }
}

#[test]
fn a_public_ceiling_takes_public_and_allowlist_requests() {
    let c = ceiling(Public, &["10.1.0.0/16"], &["evil.example"]);
    let public = narrow(&c, &request(Public, &["10.1.2.0/24"], &["1.2.3.4"])).unwrap();
    assert_eq!(public.mode(), Public);
    assert_eq!(public.server.deny.len(), 1, "the server's deny rules stay");
    assert_eq!(public.sandbox.deny.len(), 1, "and the request's apply too");
    let allowlist = narrow(
        &c,
        &request(Allowlist, &["git.example.com", "*.pkgs.example.org:443", "8.8.8.0/24", "10.1.0.0/16:5432"], &[]),
    );
    assert_eq!(allowlist.unwrap().mode(), Allowlist);
}

#[test]
fn a_public_ceiling_refuses_private_ranges_it_does_not_allow() {
    let c = ceiling(Public, &["10.1.0.0/16"], &[]);
    let got = message(narrow(&c, &request(Public, &["10.0.0.0/8"], &[])));
    assert_eq!(
        got,
        "network: this server allows public mode (public addresses, and of private ranges only 10.1.0.0/16); the \
         request's allow rule 10.0.0.0/8 overlaps 10.0.0.0/8 (a private address range), which it does not allow"
    );
    let got = message(narrow(&c, &request(Allowlist, &["169.254.169.254"], &[])));
    assert!(got.contains("169.254.169.254/32 (the cloud metadata address range)"), "{got}");
    let got = message(narrow(&ceiling(Public, &[], &[]), &request(Allowlist, &["0.0.0.0/0"], &[])));
    assert!(got.contains("allows public mode (public addresses only)"), "{got}");
}

#[test]
fn an_allowlist_ceiling_refuses_public() {
    let c = ceiling(Allowlist, &["*.pkgs.example", "10.0.0.0/8"], &[]);
    assert_eq!(
        message(narrow(&c, &request(Public, &[], &[]))),
        "network: this server allows only allowlist mode with: *.pkgs.example, 10.0.0.0/8; the request asked for public"
    );
}

#[test]
fn an_allowlist_request_must_fit_inside_the_ceiling() {
    let c = ceiling(Allowlist, &["*.pkgs.example", "git.example.com:443", "10.0.0.0/8", "[2001:db8::/32]:443"], &[]);
    for fits in [
        &["files.pkgs.example"][..],
        &["*.cdn.pkgs.example"],
        &["git.example.com:443"],
        &["10.1.0.0/16", "10.2.3.4:5432"],
        &["[2001:db8:1::/48]:443"],
        &[],
    ] {
        assert!(narrow(&c, &request(Allowlist, fits, &[])).is_ok(), "{fits:?}");
    }
    for (too_wide, rule) in [
        ("pkgs.example", "pkgs.example"),
        ("*.example", "*.example"),
        ("git.example.com", "git.example.com"),
        ("git.example.com:22", "git.example.com:22"),
        ("gitlab.com", "gitlab.com"),
        ("11.0.0.0/8", "11.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
    ] {
        let got = message(narrow(&c, &request(Allowlist, &[too_wide], &[])));
        assert_eq!(
            got,
            format!(
                "network: this server allows only allowlist mode with: *.pkgs.example, git.example.com:443, 10.0.0.0/8, \
                 [2001:db8::/32]:443; the request's allow rule {rule} is not inside any of them"
            )
        );
    }
}

#[test]
fn requests_that_do_not_read_are_refused_with_the_rule() {
    let c = ceiling(Public, &[], &[]);
    assert_eq!(
        message(narrow(&c, &request(Allowlist, &["*.*.com"], &[]))),
        "network: \"*.*.com\" is not a valid rule: a wildcard may only be the first label, as in *.example.com"
    );
    assert_eq!(
        message(narrow(&c, &request(Allowlist, &[], &["a.com:99999"]))),
        "network: \"a.com:99999\" is not a valid rule: not a port or port range (1-65535, e.g. 443 or 8000-8999)"
    );
    assert_eq!(
        message(narrow(&c, &request(NoNet, &["a.com"], &[]))),
        "network: mode none takes no allow rules (got a.com)"
    );
    assert!(
        message(narrow(&c, &request(Public, &["pkgs.example.org"], &[]))).contains("and pkgs.example.org is a name")
    );
    let many: Vec<String> = (0..300).map(|i| format!("h{i}.example")).collect();
    let huge = NetworkRequest { mode: Allowlist, allow: many, deny: Vec::new() };
    assert_eq!(message(narrow(&c, &huge)), "network: at most 256 allow rules");
}

#[test]
fn the_ceiling_reads_from_a_toml_network_table() {
    #[derive(serde::Deserialize)]
    struct File {
        network: NetworkConfig,
    }
    let file: File = toml::from_str(
        "[network]\nmode = \"allowlist\"\nallow = [\"*.pkgs.example.org\", \"10.1.0.0/16:5432\"]\ndeny = [\"bad.pkgs.example.org\"]\n",
    )
    .unwrap();
    let policy = NetworkPolicy::from_config(&file.network).unwrap();
    assert_eq!(policy.mode, Allowlist);
    assert_eq!(
        policy.describe(),
        "only allowlist mode with: *.pkgs.example.org, 10.1.0.0/16:5432, except bad.pkgs.example.org"
    );
    assert_eq!(NetworkPolicy::from_config(&NetworkConfig::default()).unwrap(), NetworkPolicy::default());
    assert!(toml::from_str::<File>("[network]\nmode = \"open\"\n").is_err());
    assert!(toml::from_str::<File>("[network]\nallowed = []\n").is_err(), "unknown keys are errors");
    let bad = NetworkConfig { mode: Some(Public), allow: strings(&["a.com"]), deny: Vec::new() };
    assert!(matches!(NetworkPolicy::from_config(&bad), Err(PolicyError::PublicAllowsOnlyRanges(_))));
}

#[test]
fn the_request_reads_from_json() {
    let r: NetworkRequest = serde_json::from_str(r#"{"mode":"allowlist","allow":["a.com"]}"#).unwrap();
    assert_eq!(r, request(Allowlist, &["a.com"], &[]));
    assert!(serde_json::from_str::<NetworkRequest>(r#"{"mode":"open"}"#).is_err());
    assert!(serde_json::from_str::<NetworkRequest>(r#"{"mode":"none","extra":1}"#).is_err());
    let schema = serde_json::to_string(&schemars::schema_for!(NetworkRequest)).unwrap();
    assert!(schema.contains("allowlist") && schema.contains("allow"));
    assert_eq!(EffectivePolicy::from_ceiling(&NetworkPolicy::default()).mode(), Public);
}
