//! The issued certificate as openssl sees it: what an operator would check by hand. openssl must
//! be installed: a missing binary fails the test rather than skipping it.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{TempDir, file_ca, id, identities};
use mesh_identity::IdentitiesConfig;

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl is required for this test and could not run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

/// Parses openssl's `-dateopt iso_8601` form, "2026-12-02 07:11:10Z".
fn iso(line: &str) -> SystemTime {
    let v = line.trim();
    let num = |range: std::ops::Range<usize>| v[range].parse::<i64>().unwrap();
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let (h, mi, s) = (num(11..13), num(14..16), num(17..19));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

#[tokio::test]
async fn issued_certificate_reads_right_in_openssl() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let ids = identities(ca, IdentitiesConfig::default());
    let workload = id("spiffe://cluster.local/ns/shop/sa/catalog");
    let issued_at = SystemTime::now();
    ids.add(workload.clone()).await.unwrap();
    let credential = ids.current(&workload).unwrap();
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, pem(&credential.certified_key().cert[0])).unwrap();
    let leaf = leaf.to_str().unwrap();

    let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", leaf]);
    assert!(ok, "openssl x509 failed:\n{text}");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let after = |header: &str| {
        let at = lines
            .iter()
            .position(|l| l.starts_with(header))
            .unwrap_or_else(|| panic!("no {header:?} in:\n{text}"));
        lines[at + 1]
    };
    // The SPIFFE ID is the only subject alternative name, and the SAN is critical because the
    // subject is empty.
    assert!(
        lines.contains(&"X509v3 Subject Alternative Name: critical"),
        "{text}"
    );
    assert_eq!(
        after("X509v3 Subject Alternative Name"),
        "URI:spiffe://cluster.local/ns/shop/sa/catalog"
    );
    assert!(
        lines.contains(&"Subject:") || lines.contains(&"Subject: "),
        "empty subject:\n{text}"
    );
    assert_eq!(after("X509v3 Basic Constraints"), "CA:FALSE");
    assert_eq!(after("X509v3 Key Usage"), "Digital Signature");
    assert_eq!(
        after("X509v3 Extended Key Usage"),
        "TLS Web Server Authentication, TLS Web Client Authentication"
    );
    assert!(
        lines.contains(&"Public Key Algorithm: id-ecPublicKey"),
        "{text}"
    );
    assert!(lines.contains(&"NIST CURVE: P-256"), "{text}");
    assert!(
        lines.contains(&"Issuer: O = Skiff mesh, CN = cluster.local root CA"),
        "{text}"
    );

    // Validity: from 5 minutes before issuance (clock skew) to 24 hours after.
    let (ok, dates) = openssl(&[
        "x509", "-noout", "-dates", "-dateopt", "iso_8601", "-in", leaf,
    ]);
    assert!(ok, "{dates}");
    let field = |name: &str| {
        dates
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {dates}"))
    };
    let not_before = iso(field("notBefore="));
    let not_after = iso(field("notAfter="));
    let off = |a: SystemTime, b: SystemTime| match a.duration_since(b) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let skew = off(issued_at, not_before);
    assert!(
        (299.0..=302.0).contains(&skew),
        "notBefore {skew} s before issuance"
    );
    let ahead = off(not_after, issued_at);
    assert!(
        (86_398.0..=86_401.0).contains(&ahead),
        "notAfter {ahead} s after issuance"
    );
    // And as openssl's own expiry check says it: not within 23 h 55 min, yes within 24 h 5 min.
    let (ok, _) = openssl(&["x509", "-noout", "-checkend", "86100", "-in", leaf]);
    assert!(ok, "certificate must not expire within 23 h 55 min");
    let (ok, _) = openssl(&["x509", "-noout", "-checkend", "86700", "-in", leaf]);
    assert!(!ok, "certificate must expire within 24 h 5 min");

    // The chain verifies against the root for client and server use.
    let ca = dir.path().join("ca.crt");
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            ca.to_str().unwrap(),
            leaf,
        ]);
        assert!(ok, "openssl verify -purpose {purpose}:\n{out}");
        assert_eq!(out.trim(), format!("{leaf}: OK"));
    }

    // The CA helper's root is a CA for its trust domain.
    let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", ca.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("URI:spiffe://cluster.local"), "{text}");
}
