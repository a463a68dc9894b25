//! A throwaway certificate authority for TLS tests, made with the `openssl` command.
use std::path::{Path, PathBuf};

use crate::sh;

/// A CA in a folder; issues leaf certificates signed by it.
pub struct Ca {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path) -> Ca {
        std::fs::create_dir_all(dir).expect("ca dir");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        sh(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=mesh test CA",
            "-keyout",
            key.to_str().expect("utf8"),
            "-out",
            cert.to_str().expect("utf8"),
        ]);
        Ca {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A leaf certificate for `names` (DNS SANs); returns (cert, key) paths.
    pub fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key, csr) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
            self.dir.join(format!("{file}.csr")),
        );
        let ext = self.dir.join(format!("{file}.ext"));
        let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).expect("ext");
        sh(&[
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={}", names[0]),
            "-keyout",
            key.to_str().expect("utf8"),
            "-out",
            csr.to_str().expect("utf8"),
        ]);
        sh(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            csr.to_str().expect("utf8"),
            "-CA",
            self.cert.to_str().expect("utf8"),
            "-CAkey",
            self.key.to_str().expect("utf8"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().expect("utf8"),
            "-out",
            cert.to_str().expect("utf8"),
        ]);
        (cert, key)
    }
}
