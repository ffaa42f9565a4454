//! Rule syntax, name matching and the special ranges.

use std::net::IpAddr;

use crate::network::ranges::{canonical, special, special_overlap, Cidr, RangeError};
use crate::network::rules::{normalize_name, NamePattern, Ports, Rule, RuleError, Target};

fn rule(text: &str) -> Rule {
    text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn every_rule_kind_parses_and_prints_back() {
    for (text, printed) in [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("example.com:443", "example.com:443"),
        ("*.example.com:8000-8999", "*.example.com:8000-8999"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3"),
        ("10.0.0.0/8:5432", "10.0.0.0/8:5432"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("[2001:db8::/32]", "2001:db8::/32"),
        ("  _acme-challenge.x.org  ", "_acme-challenge.x.org"),
    ] {
        assert_eq!(rule(text).to_string(), printed, "{text:?}");
        assert_eq!(rule(printed), rule(text), "{printed:?} reads back");
    }
    assert_eq!(rule("a.com:443").ports, Ports::Range(443, 443));
    assert_eq!(rule("a.com").ports, Ports::Any);
    assert!(matches!(rule("10.1.2.3").target, Target::Cidr(c) if c.prefix() == 32));
}

#[test]
fn invalid_rules_are_refused_with_why() {
    let cases: &[(&str, RuleError)] = &[
        ("", RuleError::Empty),
        ("*", RuleError::Wildcard),
        ("a.*.com", RuleError::Wildcard),
        ("*example.com", RuleError::Wildcard),
        ("*.*.com", RuleError::Wildcard),
        ("a.com:0", RuleError::Port),
        ("a.com:65536", RuleError::Port),
        ("a.com:https", RuleError::Port),
        ("a.com:", RuleError::Port),
        ("a.com:9-1", RuleError::Port),
        ("10.0.0.1/8", RuleError::Range(RangeError::HostBits("10.0.0.0/8".parse().unwrap()))),
        ("10.0.0.0/33", RuleError::Range(RangeError::Prefix(33))),
        ("10.0.0.0/", RuleError::Range(RangeError::Syntax)),
        ("::ffff:10.0.0.0/104", RuleError::Range(RangeError::Mapped)),
        ("[2001:db8::/32", RuleError::Range(RangeError::Syntax)),
        ("[2001:db8::/32]443", RuleError::Port),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<Rule>().as_ref(), Err(want), "{text:?}");
    }
    for bad in ["a..com", "-a.com", "a-.com", "a b.com", "exa$mple.com", "1.2.3", "a.123", &"a".repeat(64), ".a.com"] {
        assert!(matches!(bad.parse::<Rule>(), Err(RuleError::Name(_) | RuleError::Range(_))), "{bad:?}");
    }
    let long = ["a"; 130].join(".");
    assert!(matches!(long.parse::<Rule>(), Err(RuleError::Name(_))));
    assert_eq!("a".repeat(400).parse::<Rule>(), Err(RuleError::TooLong));
}

#[test]
fn wildcards_match_subdomains_only() {
    let wild = NamePattern::Subdomains("example.com".into());
    assert!(wild.matches("a.example.com"));
    assert!(wild.matches("a.b.example.com"));
    assert!(!wild.matches("example.com"), "not the name itself");
    assert!(!wild.matches("badexample.com"));
    assert!(!wild.matches("a.badexample.com"));
    assert!(!wild.matches("example.com.evil.org"));
    assert!(!wild.matches(".example.com"));
    let exact = NamePattern::Exact("example.com".into());
    assert!(exact.matches("example.com") && !exact.matches("a.example.com"));
    assert_eq!(normalize_name("A.Example.COM.").unwrap(), "a.example.com");
}

#[test]
fn names_and_ranges_nest_for_narrowing() {
    let within = |inner: &str, outer: &str| rule(inner).within(&rule(outer));
    assert!(within("a.example.com", "*.example.com"));
    assert!(within("*.a.example.com", "*.example.com"));
    assert!(within("*.example.com", "*.example.com"));
    assert!(!within("example.com", "*.example.com"));
    assert!(!within("*.example.com", "example.com"));
    assert!(!within("*.example.com", "*.a.example.com"));
    assert!(!within("*.badexample.com", "*.example.com"));
    assert!(within("10.1.0.0/16", "10.0.0.0/8"));
    assert!(within("10.1.2.3", "10.0.0.0/8"));
    assert!(!within("10.0.0.0/8", "10.1.0.0/16"));
    assert!(!within("11.0.0.0/8", "10.0.0.0/8"));
    assert!(within("[2001:db8:1::/48]:443", "2001:db8::/32"));
    assert!(!within("2001:db8::/32", "10.0.0.0/8"));
    assert!(!within("a.com", "10.0.0.0/8"), "a name is never inside a range");
    // Ports.
    assert!(within("a.com:443", "a.com"));
    assert!(within("a.com:8080-8090", "a.com:8000-8999"));
    assert!(!within("a.com", "a.com:443"));
    assert!(!within("a.com:80-443", "a.com:443"));
}

#[test]
fn cidrs_contain_and_overlap() {
    let c: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(c.contains(ip("10.255.0.1")) && !c.contains(ip("11.0.0.1")));
    assert!(!c.contains(ip("::ffff:10.0.0.1")), "compare canonical addresses");
    assert!(c.contains(canonical(ip("::ffff:10.0.0.1"))));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(ip("1.2.3.4")) && !all.contains(ip("::1")));
    let v6: Cidr = "::/0".parse().unwrap();
    assert!(v6.contains(ip("2001:db8::1")));
    assert!(c.overlaps(&"10.1.0.0/16".parse().unwrap()) && !c.overlaps(&"11.0.0.0/8".parse().unwrap()));
}

#[test]
fn special_ranges_are_named() {
    for (addr, what, hard) in [
        ("10.0.0.1", "a private address", false),
        ("172.31.255.255", "a private address", false),
        ("192.168.1.1", "a private address", false),
        ("127.0.0.1", "a loopback address", true),
        ("169.254.169.254", "the cloud metadata address", false),
        ("169.254.1.1", "a link-local address", false),
        ("100.64.0.1", "a shared (CGNAT) address", false),
        ("224.0.0.1", "a multicast address", true),
        ("255.255.255.255", "the broadcast address", true),
        ("0.0.0.0", "the unspecified address", true),
        ("0.1.2.3", "a \"this network\" address", false),
        ("192.0.2.1", "a documentation address", false),
        ("198.18.0.1", "a benchmarking address", false),
        ("240.0.0.1", "a reserved address", false),
        ("::", "the unspecified address", true),
        ("::1", "a loopback address", true),
        ("::ffff:10.0.0.1", "a private address", false),
        ("::ffff:127.0.0.1", "a loopback address", true),
        ("::10.0.0.1", "an IPv4-compatible address (deprecated)", false),
        ("fc00::1", "a unique local address", false),
        ("fd12:3456::1", "a unique local address", false),
        ("fe80::1", "a link-local address", false),
        ("ff02::1", "a multicast address", true),
        ("2001:db8::1", "a documentation address", false),
        ("2001::1", "a Teredo address", false),
        ("64:ff9b::a00:1", "a NAT64 address embedding private address 10.0.0.1", false),
        ("64:ff9b::7f00:1", "a NAT64 address embedding loopback address 127.0.0.1", true),
        ("2002:a9fe:a9fe::1", "a 6to4 address embedding cloud metadata address 169.254.169.254", false),
        ("4000::1", "an address outside IPv6 global unicast", false),
    ] {
        let s = special(ip(addr)).unwrap_or_else(|| panic!("{addr} is special"));
        assert_eq!((s.what.as_str(), s.hard), (what, hard), "{addr}");
    }
    for public in ["1.1.1.1", "8.8.8.8", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
        assert_eq!(special(ip(public)), None, "{public}");
    }
    assert_eq!(special(ip("64:ff9b::808:808")), None, "NAT64 of a public address is public");
    assert_eq!(special(ip("2002:808:808::1")), None, "6to4 of a public address is public");
}

#[test]
fn ranges_that_touch_special_ones_are_found() {
    let overlap = |text: &str| special_overlap(&text.parse().unwrap()).map(|s| s.what);
    assert_eq!(overlap("8.8.8.0/24"), None);
    assert_eq!(overlap("10.1.0.0/16").as_deref(), Some("a private address"));
    assert_eq!(overlap("0.0.0.0/0").as_deref(), Some("the unspecified address"));
    assert_eq!(overlap("2606:4700::/32"), None);
    assert_eq!(overlap("2002::/16").as_deref(), Some("a 6to4 address"));
    assert_eq!(overlap("::/0").as_deref(), Some("the unspecified address"));
    assert_eq!(overlap("fd00::/8").as_deref(), Some("a unique local address"));
}
