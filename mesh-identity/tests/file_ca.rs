//! Loading a CA from files: every way it can be wrong gives an error naming the file and why;
//! leaves never outlive the CA.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{TempDir, id, identities, td};
use mesh_identity::{FileCa, IdentitiesConfig, RootCaPem};

fn load(dir: &Path, cert: &str, key: &str) -> String {
    FileCa::load(td("cluster.local"), &dir.join(cert), &dir.join(key))
        .expect_err("load must fail")
        .to_string()
}

#[test]
fn missing_files_are_named() {
    let dir = TempDir::new();
    let d = dir.path();
    assert_eq!(
        load(d, "nope.crt", "nope.key"),
        format!(
            "cannot read CA certificate {}: No such file or directory (os error 2)",
            d.join("nope.crt").display()
        )
    );
    let root =
        RootCaPem::generate_valid_for(&td("cluster.local"), Duration::from_secs(3600)).unwrap();
    root.write_to(d).unwrap();
    assert_eq!(
        load(d, "ca.crt", "nope.key"),
        format!(
            "cannot read CA private key {}: No such file or directory (os error 2)",
            d.join("nope.key").display()
        )
    );
}

#[test]
fn garbage_files_are_named() {
    let dir = TempDir::new();
    let d = dir.path();
    let root =
        RootCaPem::generate_valid_for(&td("cluster.local"), Duration::from_secs(3600)).unwrap();
    root.write_to(d).unwrap();
    std::fs::write(d.join("empty.pem"), "hello\n").unwrap();
    assert_eq!(
        load(d, "empty.pem", "ca.key"),
        format!(
            "CA certificate {} is not usable: no CERTIFICATE block found",
            d.join("empty.pem").display()
        )
    );
    let err = load(d, "ca.crt", "empty.pem");
    assert!(
        err.starts_with(&format!(
            "CA private key {} is not usable: no private key found",
            d.join("empty.pem").display()
        )),
        "{err}"
    );
}

#[test]
fn a_certificate_that_is_not_a_ca_is_refused() {
    let dir = TempDir::new();
    let d = dir.path();
    // A self-signed end-entity certificate (as a server certificate would be) with its key.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["web.example".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(d.join("leaf.crt"), cert.pem()).unwrap();
    std::fs::write(d.join("leaf.key"), key.serialize_pem()).unwrap();
    assert_eq!(
        load(d, "leaf.crt", "leaf.key"),
        format!(
            "CA certificate {} is not a CA certificate: basicConstraints has CA:FALSE",
            d.join("leaf.crt").display()
        )
    );
    // Without basicConstraints at all.
    let plain = rcgen::CertificateParams::new(vec!["web.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(d.join("plain.crt"), plain.pem()).unwrap();
    assert_eq!(
        load(d, "plain.crt", "leaf.key"),
        format!(
            "CA certificate {} is not a CA certificate: it has no basicConstraints extension",
            d.join("plain.crt").display()
        )
    );
}

#[test]
fn a_key_of_another_ca_is_refused() {
    let dir = TempDir::new();
    let d = dir.path();
    let domain = td("cluster.local");
    let one = RootCaPem::generate_valid_for(&domain, Duration::from_secs(3600)).unwrap();
    let two = RootCaPem::generate_valid_for(&domain, Duration::from_secs(3600)).unwrap();
    std::fs::write(d.join("one.crt"), &one.cert_pem).unwrap();
    std::fs::write(d.join("two.key"), &two.key_pem).unwrap();
    assert_eq!(
        load(d, "one.crt", "two.key"),
        format!(
            "CA private key {} does not match the CA certificate {}",
            d.join("two.key").display(),
            d.join("one.crt").display()
        )
    );
}

#[test]
fn an_expired_ca_is_refused() {
    let dir = TempDir::new();
    let d = dir.path();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let old = RootCaPem::generate(&td("cluster.local"), now - 10 * day, now - day).unwrap();
    old.write_to(d).unwrap();
    let err = load(d, "ca.crt", "ca.key");
    let prefix = format!(
        "CA certificate {} is not valid now: valid from ",
        d.join("ca.crt").display()
    );
    assert!(err.starts_with(&prefix), "{err}");
}

#[test]
fn a_legacy_sec1_key_gets_a_conversion_hint() {
    let dir = TempDir::new();
    let d = dir.path();
    let root =
        RootCaPem::generate_valid_for(&td("cluster.local"), Duration::from_secs(3600)).unwrap();
    root.write_to(d).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["ec", "-in"])
        .arg(d.join("ca.key"))
        .arg("-out")
        .arg(d.join("sec1.key"))
        .output()
        .expect("openssl is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = load(d, "ca.crt", "sec1.key");
    assert!(err.contains("openssl pkcs8 -topk8 -nocrypt"), "{err}");
}

#[tokio::test]
async fn leaves_never_outlive_the_ca() {
    let dir = TempDir::new();
    let d = dir.path();
    let now = SystemTime::now();
    let domain = td("cluster.local");
    // A CA with one hour left; the identity asks for 24 hours.
    let root = RootCaPem::generate(
        &domain,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
    .unwrap();
    let (cert, key) = root.write_to(d).unwrap();
    let ca = FileCa::load(domain, &cert, &key).unwrap();
    let ca_not_after = ca.not_after();
    let ids = identities(ca, IdentitiesConfig::default());
    let workload = id("spiffe://cluster.local/ns/shop/sa/catalog");
    ids.add(workload.clone()).await.unwrap();
    let credential = ids.current(&workload).unwrap();
    assert_eq!(credential.not_after(), ca_not_after);
    // notBefore is not earlier than the CA's either (5 minutes of skew would be).
    assert!(credential.not_before() >= now - Duration::from_secs(61));
}
