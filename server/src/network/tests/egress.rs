//! The egress decisions: public and allowlist modes, IP literals, mapped and embedded IPv6,
//! DNS rebinding, expiry, deny rules, ports, TLS/HTTP fronting, UDP, and the reasons.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use capsule_tool_schemas::{NetworkMode, NetworkRequest};
use capsule_vmm::net::broker::FirstBytes;

use crate::network::egress::{Decision, Egress, MAX_RESOLUTIONS, RESOLUTION_GRACE};
use crate::network::policy::{narrow, EffectivePolicy, NetworkPolicy};

use NetworkMode::{Allowlist, Public};

const HOST_ADDR: &str = "203.0.114.7";
const TTL: Duration = Duration::from_secs(300);

fn strings(rules: &[&str]) -> Vec<String> {
    rules.iter().map(|s| s.to_string()).collect()
}

fn policy(mode: NetworkMode, allow: &[&str], deny: &[&str]) -> NetworkPolicy {
    NetworkPolicy::new(mode, &strings(allow), &strings(deny)).expect("a valid policy")
}

/// An egress whose server and sandbox layers are both `mode`, `allow`, `deny`.
fn egress(mode: NetworkMode, allow: &[&str], deny: &[&str]) -> Egress {
    Egress::new(EffectivePolicy::from_ceiling(&policy(mode, allow, deny)), [HOST_ADDR.parse().unwrap()])
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|t| t.parse().unwrap()).collect()
}

fn tls(name: &str) -> FirstBytes {
    FirstBytes::TlsServerName(name.into())
}

fn refusal(decision: Decision) -> String {
    match decision {
        Decision::Refuse(why) => why,
        Decision::Allow => panic!("allowed, but a refusal was expected"),
    }
}

#[test]
fn public_reaches_public_addresses_only() {
    let e = egress(Public, &[], &[]);
    let now = Instant::now();
    assert!(e.check_connect(addr("1.1.1.1:443"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("[2606:4700::1111]:443"), None, Some(&FirstBytes::Unrecognized), now).is_allowed());
    assert!(e.check_udp(addr("8.8.8.8:53"), now).is_allowed());
    assert_eq!(
        refusal(e.check_connect(addr("10.0.0.1:80"), None, None, now)),
        "10.0.0.1 is a private address (10.0.0.0/8); the sandbox's policy is public, which reaches only public addresses"
    );
    for private in [
        "169.254.169.254:80",
        "100.64.1.1:80",
        "192.168.0.1:22",
        "172.16.0.1:443",
        "192.0.2.1:80",
        "198.18.0.1:80",
        "240.0.0.1:80",
        "[fd00::1]:80",
        "[fe80::1]:80",
        "[2001:db8::1]:80",
        "[::ffff:10.0.0.1]:80",
        "[::ffff:169.254.169.254]:80",
        "[::10.0.0.1]:80",
        "[64:ff9b::a00:1]:80",
        "[2002:c0a8:1::1]:80",
        "[2001::1]:80",
    ] {
        assert!(!e.check_connect(addr(private), None, None, now).is_allowed(), "{private}");
        assert!(!e.check_udp(addr(private), now).is_allowed(), "{private} (UDP)");
    }
    assert!(e.check_connect(addr("[64:ff9b::101:101]:443"), None, None, now).is_allowed(), "NAT64 of 1.1.1.1");
    assert_eq!(refusal(e.check_connect(addr("1.1.1.1:0"), None, None, now)), "port 0 is not a destination");
}

#[test]
fn loopback_multicast_and_the_host_itself_are_never_reached() {
    // Even an allow rule covering everything does not reach them.
    let e = egress(Allowlist, &["0.0.0.0/0", "::/0"], &[]);
    let now = Instant::now();
    assert_eq!(
        refusal(e.check_connect(addr("127.0.0.1:8080"), None, None, now)),
        "127.0.0.1 is a loopback address; no policy reaches it"
    );
    assert_eq!(
        refusal(e.check_connect(addr(&format!("{HOST_ADDR}:22")), None, None, now)),
        format!("{HOST_ADDR} is an address of the host itself; no policy reaches it")
    );
    for never in
        ["[::1]:80", "[::ffff:127.0.0.1]:80", "0.0.0.0:80", "[::]:80", "224.0.0.251:5353", "255.255.255.255:67"]
    {
        assert!(!e.check_connect(addr(never), None, None, now).is_allowed(), "{never}");
        assert!(!e.check_udp(addr(never), now).is_allowed(), "{never} (UDP)");
    }
    assert!(!e.check_connect(addr(&format!("[::ffff:{HOST_ADDR}]:80")), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("[2002:cb00:7207::1]:80"), None, None, now).is_allowed(), "6to4 of the host");
    assert!(e.check_connect(addr("10.0.0.1:80"), None, None, now).is_allowed(), "the allow rule reaches private");
}

#[test]
fn an_explicit_range_reaches_private_addresses() {
    let e = egress(Public, &["10.1.0.0/16", "169.254.169.254:80"], &[]);
    let now = Instant::now();
    assert!(e.check_connect(addr("10.1.2.3:5432"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("[::ffff:10.1.2.3]:5432"), None, None, now).is_allowed(), "mapped form too");
    assert!(!e.check_connect(addr("10.2.0.1:5432"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("169.254.169.254:80"), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("169.254.169.254:443"), None, None, now).is_allowed(), "only on its port");
    assert!(!e.check_connect(addr("[64:ff9b::a01:203]:5432"), None, None, now).is_allowed(), "not through NAT64");
}

#[test]
fn allowlist_reaches_an_address_only_through_an_allowed_name() {
    let mut e = egress(Allowlist, &["api.good.com", "*.pkgs.example"], &[]);
    let now = Instant::now();
    assert!(e.check_resolve("API.good.com.").is_allowed());
    assert!(e.check_resolve("files.pkgs.example").is_allowed());
    assert_eq!(
        refusal(e.check_resolve("evil.com")),
        "evil.com is not on the sandbox's allowlist (allowed: api.good.com, *.pkgs.example)"
    );
    assert!(!e.check_resolve("pkgs.example").is_allowed(), "a wildcard does not cover the name itself");
    assert!(!e.check_resolve("badpkgs.example").is_allowed());
    assert!(!e.check_resolve("bad name").is_allowed());
    // An IP literal nobody resolved is refused.
    assert_eq!(
        refusal(e.check_connect(addr("93.184.216.34:22"), None, None, now)),
        "93.184.216.34 port 22 is not on the sandbox's allowlist (allowed: api.good.com, *.pkgs.example); an \
         address is reachable only by a name on the allowlist that the sandbox's resolver resolved to it"
    );
    let answer = e.filter_resolved("api.good.com", &ips(&["93.184.216.34", "2606:2800::1"]), TTL, now);
    assert_eq!(answer.addrs, ips(&["93.184.216.34", "2606:2800::1"]));
    assert_eq!(answer.ttl_s, 300);
    assert!(e.check_connect(addr("93.184.216.34:22"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("93.184.216.34:22"), Some("api.good.com"), None, now).is_allowed());
    assert!(e.check_connect(addr("[2606:2800::1]:8080"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("[::ffff:93.184.216.34]:22"), None, None, now).is_allowed(), "mapped form");
    assert_eq!(
        refusal(e.check_connect(addr("93.184.216.34:22"), Some("other.pkgs.example"), None, now)),
        "93.184.216.34 is not an address other.pkgs.example resolved to through the sandbox's resolver (or that \
         answer expired)"
    );
    assert_eq!(
        refusal(e.check_connect(addr("93.184.216.34:22"), Some("evil.com"), None, now)),
        "evil.com is not on the sandbox's allowlist (allowed: api.good.com, *.pkgs.example)"
    );
    // A name the policy refuses is not resolved, and nothing is recorded for it.
    let evil = e.filter_resolved("evil.com", &ips(&["5.6.7.8"]), TTL, now);
    assert!(evil.addrs.is_empty());
    assert_eq!(
        evil.withheld[0].1,
        "evil.com is not on the sandbox's allowlist (allowed: api.good.com, *.pkgs.example)"
    );
    assert!(!e.check_connect(addr("5.6.7.8:22"), None, None, now).is_allowed());
}

#[test]
fn resolutions_expire() {
    let mut e = egress(Allowlist, &["api.good.com"], &[]);
    let now = Instant::now();
    e.filter_resolved("api.good.com", &ips(&["93.184.216.34"]), TTL, now);
    let still = now + TTL + RESOLUTION_GRACE - Duration::from_secs(1);
    assert!(e.check_connect(addr("93.184.216.34:22"), None, None, still).is_allowed());
    let after = now + TTL + RESOLUTION_GRACE;
    assert!(!e.check_connect(addr("93.184.216.34:22"), None, None, after).is_allowed());
    let got = refusal(e.check_connect(addr("93.184.216.34:22"), Some("api.good.com"), None, after));
    assert!(got.ends_with("(or that answer expired)"), "{got}");
    // A fresh answer renews it; a huge TTL is capped.
    let answer = e.filter_resolved("api.good.com", &ips(&["93.184.216.34"]), Duration::from_secs(1 << 30), after);
    assert_eq!(answer.ttl_s, 3600);
    assert!(e.check_connect(addr("93.184.216.34:22"), None, None, after).is_allowed());
}

#[test]
fn dns_rebinding_never_reaches_a_private_address() {
    for mode in [Public, Allowlist] {
        let allow: &[&str] = if mode == Allowlist { &["rebind.example"] } else { &[] };
        let mut e = egress(mode, allow, &[]);
        let now = Instant::now();
        let first = e.filter_resolved("rebind.example", &ips(&["93.184.216.34"]), Duration::ZERO, now);
        assert_eq!(first.addrs, ips(&["93.184.216.34"]));
        // Later the same name answers with private, metadata and loopback addresses.
        let later = now + Duration::from_secs(5);
        let second = e.filter_resolved(
            "rebind.example",
            &ips(&["10.0.0.5", "169.254.169.254", "127.0.0.1", "::ffff:192.168.1.1", "fd00::1", "93.184.216.35"]),
            Duration::ZERO,
            later,
        );
        assert_eq!(second.addrs, ips(&["93.184.216.35"]), "{mode:?}: the guest never learns a private address");
        assert_eq!(second.withheld.len(), 5);
        assert!(
            second.withheld[0].1.starts_with("10.0.0.5 is a private address (10.0.0.0/8)"),
            "{:?}",
            second.withheld
        );
        let via_name =
            e.check_connect(addr("10.0.0.5:80"), Some("rebind.example"), Some(&tls("rebind.example")), later);
        assert!(!via_name.is_allowed(), "{mode:?}");
    }
}

#[test]
fn a_private_answer_is_kept_where_a_range_rule_covers_it() {
    let mut e = egress(Allowlist, &["mirror.corp", "10.1.0.0/16"], &[]);
    let now = Instant::now();
    let answer = e.filter_resolved("mirror.corp", &ips(&["10.1.2.3", "10.9.9.9"]), TTL, now);
    assert_eq!(answer.addrs, ips(&["10.1.2.3"]));
    assert!(answer.withheld[0].1.contains("allowlist reaches such an address only through an address rule"));
    assert!(e
        .check_connect(addr("10.1.2.3:443"), Some("mirror.corp"), Some(&FirstBytes::Unrecognized), now)
        .is_allowed());
}

#[test]
fn deny_rules_win() {
    let e = egress(Allowlist, &["*.good.com", "10.0.0.0/8"], &["bad.good.com", "10.6.0.0/16", "*.good.com:25"]);
    let now = Instant::now();
    assert_eq!(refusal(e.check_resolve("bad.good.com")), "bad.good.com is denied by the sandbox's rule bad.good.com");
    assert!(e.check_resolve("mail.good.com").is_allowed(), "a deny rule with a port does not stop resolving");
    assert_eq!(
        refusal(e.check_connect(addr("10.6.1.1:443"), None, None, now)),
        "denied by the sandbox's rule 10.6.0.0/16"
    );
    assert!(e.check_connect(addr("10.5.1.1:443"), None, None, now).is_allowed());
    let mut e = e;
    e.filter_resolved("mail.good.com", &ips(&["1.2.3.4"]), TTL, now);
    assert!(e.check_connect(addr("1.2.3.4:587"), Some("mail.good.com"), None, now).is_allowed());
    assert_eq!(
        refusal(e.check_connect(addr("1.2.3.4:25"), Some("mail.good.com"), None, now)),
        "denied by the sandbox's rule *.good.com:25"
    );
    // In public mode: names through the resolver, the connection's name and its first bytes.
    let e = egress(Public, &[], &["evil.com", "1.2.3.0/24", "*.ads.example"]);
    assert!(!e.check_resolve("evil.com").is_allowed());
    assert!(!e.check_resolve("x.ads.example").is_allowed());
    assert!(e.check_resolve("ads.example").is_allowed());
    assert!(!e.check_connect(addr("1.2.3.9:443"), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("[64:ff9b::102:309]:443"), None, None, now).is_allowed(), "NAT64 of a denied range");
    assert!(!e.check_connect(addr("5.5.5.5:443"), None, Some(&tls("evil.com")), now).is_allowed());
    let host = FirstBytes::HttpHost("EVIL.com".into());
    assert!(!e.check_connect(addr("5.5.5.5:80"), None, Some(&host), now).is_allowed());
    assert!(e.check_connect(addr("5.5.5.5:443"), None, Some(&tls("good.com")), now).is_allowed());
}

#[test]
fn ports_limit_allow_rules() {
    let mut e = egress(Allowlist, &["api.good.com:443", "10.0.0.0/8:5432", "[2001:db8::/32]:8000-8999"], &[]);
    let now = Instant::now();
    e.filter_resolved("api.good.com", &ips(&["93.184.216.34"]), TTL, now);
    assert!(e.check_connect(addr("93.184.216.34:443"), None, Some(&tls("api.good.com")), now).is_allowed());
    assert_eq!(
        refusal(e.check_connect(addr("93.184.216.34:22"), Some("api.good.com"), None, now)),
        "port 22 of api.good.com is not on the sandbox's allowlist (allowed: api.good.com:443, 10.0.0.0/8:5432, \
         [2001:db8::/32]:8000-8999)"
    );
    assert!(!e.check_connect(addr("93.184.216.34:22"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("10.2.3.4:5432"), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("10.2.3.4:5433"), None, None, now).is_allowed());
    assert!(e.check_connect(addr("[2001:db8::5]:8500"), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("[2001:db8::5]:9000"), None, None, now).is_allowed());
}

#[test]
fn web_ports_need_the_tls_or_http_name_the_address_came_from() {
    let mut e = egress(Allowlist, &["api.good.com", "*.cdn.example"], &[]);
    let now = Instant::now();
    // api.good.com and a.cdn.example share a CDN address; evil.com (not allowed) is there too.
    e.filter_resolved("api.good.com", &ips(&["151.101.1.1"]), TTL, now);
    e.filter_resolved("a.cdn.example", &ips(&["151.101.1.1"]), TTL, now);
    let cdn = addr("151.101.1.1:443");
    assert!(e.check_connect(cdn, Some("api.good.com"), Some(&tls("api.good.com")), now).is_allowed());
    assert!(e.check_connect(cdn, Some("api.good.com"), Some(&tls("API.GOOD.COM.")), now).is_allowed());
    assert!(e.check_connect(cdn, None, Some(&tls("a.cdn.example")), now).is_allowed());
    assert_eq!(
        refusal(e.check_connect(cdn, Some("api.good.com"), Some(&tls("evil.com")), now)),
        "TLS server name evil.com does not match api.good.com"
    );
    assert_eq!(
        refusal(e.check_connect(cdn, Some("api.good.com"), Some(&tls("a.cdn.example")), now)),
        "TLS server name a.cdn.example does not match api.good.com",
        "an allowed name cannot front for another either"
    );
    assert_eq!(
        refusal(e.check_connect(cdn, None, Some(&tls("b.cdn.example")), now)),
        "TLS server name b.cdn.example does not match api.good.com or a.cdn.example"
    );
    let http = addr("151.101.1.1:80");
    let evil_host = FirstBytes::HttpHost("evil.com".into());
    assert_eq!(
        refusal(e.check_connect(http, Some("api.good.com"), Some(&evil_host), now)),
        "HTTP Host evil.com does not match api.good.com"
    );
    let good_host = FirstBytes::HttpHost("api.good.com".into());
    assert!(e.check_connect(http, Some("api.good.com"), Some(&good_host), now).is_allowed());
    assert_eq!(
        refusal(e.check_connect(cdn, Some("api.good.com"), Some(&FirstBytes::Unrecognized), now)),
        "no TLS server name or HTTP Host in what the sandbox sent first on port 443; the sandbox's allowlist needs \
         one to check against api.good.com"
    );
    assert!(!e.check_connect(cdn, Some("api.good.com"), None, now).is_allowed());
    // Other ports are not checked by first bytes; UDP to 443 (QUIC) cannot be.
    assert!(e.check_connect(addr("151.101.1.1:8443"), Some("api.good.com"), None, now).is_allowed());
    assert_eq!(
        refusal(e.check_udp(cdn, now)),
        "UDP to port 443 (QUIC) cannot be checked against the sandbox's allowlist; use TCP"
    );
    assert!(e.check_udp(addr("151.101.1.1:3478"), now).is_allowed());
}

#[test]
fn both_layers_decide() {
    let ceiling = policy(Public, &[], &["*.blocked.example", "9.9.9.9"]);
    let request =
        NetworkRequest { mode: Allowlist, allow: strings(&["x.blocked.example", "9.9.9.0/24"]), deny: vec![] };
    let mut e = Egress::new(narrow(&ceiling, &request).unwrap(), []);
    let now = Instant::now();
    assert_eq!(
        refusal(e.check_resolve("x.blocked.example")),
        "x.blocked.example is denied by this server's rule *.blocked.example"
    );
    assert!(e.filter_resolved("x.blocked.example", &ips(&["1.2.3.4"]), TTL, now).addrs.is_empty());
    assert_eq!(refusal(e.check_connect(addr("9.9.9.9:53"), None, None, now)), "denied by this server's rule 9.9.9.9");
    assert!(e.check_connect(addr("9.9.9.10:53"), None, None, now).is_allowed());
    assert!(!e.check_connect(addr("8.8.8.8:53"), None, None, now).is_allowed(), "the sandbox's allowlist holds");
    let none =
        Egress::new(narrow(&ceiling, &NetworkRequest { mode: NetworkMode::None, ..Default::default() }).unwrap(), []);
    assert_eq!(
        refusal(none.check_connect(addr("1.1.1.1:443"), None, None, now)),
        "the sandbox has no network (its network mode is none)"
    );
    assert_eq!(refusal(none.check_resolve("a.com")), "the sandbox has no network (its network mode is none)");
    let server_none = Egress::new(EffectivePolicy::from_ceiling(&policy(NetworkMode::None, &[], &[])), []);
    assert_eq!(refusal(server_none.check_udp(addr("1.1.1.1:53"), now)), "this server allows no network");
}

#[test]
fn the_resolution_record_stays_bounded() {
    let mut e = egress(Public, &[], &[]);
    let now = Instant::now();
    for i in 0..(MAX_RESOLUTIONS as u32 + 100) {
        let ip = IpAddr::from((0x0808_0000u32 + i).to_be_bytes());
        e.filter_resolved(&format!("h{i}.example"), &[ip], Duration::from_secs(u64::from(i)), now);
    }
    assert_eq!(e.resolution_count(), MAX_RESOLUTIONS);
    // Repeats and duplicates do not add.
    e.filter_resolved("h1.example", &ips(&["8.8.0.1", "8.8.0.1"]), TTL, now);
    assert_eq!(e.resolution_count(), MAX_RESOLUTIONS);
}
