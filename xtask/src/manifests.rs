//! `cargo xtask manifests` (also run by `cargo xtask test`): what `kubectl apply -k manifests/`
//! would take is checked without a cluster.
//!
//! 1. `kubectl kustomize` renders the base and the monitoring overlay;
//! 2. every rendered object, the CRD included, validates against the Kubernetes 1.32 schemas
//!    (kubernetes-validate, strict: unknown fields fail);
//! 3. every MeshPolicy under `manifests/examples/` validates against the generated CRD's
//!    `openAPIV3Schema` (jsonschema; CEL rules are not evaluated there);
//! 4. every example policy file passes `mesh-agent check`.
//!
//! Each failure names the file, the object and the field.
use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::{setup, util::root};

/// The Kubernetes version whose schemas the manifests must satisfy (k8s-openapi's `v1_32`).
const KUBERNETES_VERSION: &str = "1.32.0";
/// Kustomizations to render, relative to the workspace root.
const KUSTOMIZATIONS: &[&str] = &["manifests", "manifests/monitoring"];
/// Kinds whose CRDs are not ours and not in kubernetes-validate: rendered but not schema-checked.
const NO_SCHEMA: &[&str] = &["monitoring.coreos.com/v1 PodMonitor"];
/// The example agent configuration `mesh-agent check` reads with each example policy.
const AGENT_CONFIG: &str = "manifests/examples/agent.yaml";
const CHECKER: &str = include_str!("manifests.py");

pub fn run(agent: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut objects = Vec::new();
    for dir in KUSTOMIZATIONS {
        let out = Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(root())
            .output()
            .context("running kubectl (1.32 or newer) for `kubectl kustomize`")?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize {dir} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let source = format!("{dir}/ (kustomize)");
        for (_, object) in documents(&String::from_utf8(out.stdout)?, &source)? {
            objects.push(json!({"source": source, "object": object}));
        }
    }
    let crd = objects
        .iter()
        .map(|o| &o["object"])
        .find(|o| {
            o["kind"] == "CustomResourceDefinition"
                && o["metadata"]["name"] == "meshpolicies.skiff.dev"
        })
        .cloned()
        .context("the base does not render the MeshPolicy CRD (manifests/crds/meshpolicy.yaml)")?;

    let examples = root().join("manifests/examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .with_context(|| format!("reading {}", examples.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| !p.ends_with(Path::new(AGENT_CONFIG).file_name().unwrap_or_default()))
        .collect();
    files.sort();
    let mut custom = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {rel}"))?;
        for (n, object) in documents(&text, &rel)? {
            if object["kind"] == "MeshPolicy" {
                custom.push(json!({"source": format!("{rel}#{n}"), "object": object}));
            }
        }
    }

    let request = json!({
        "kubernetes": KUBERNETES_VERSION,
        "objects": objects,
        "no_schema": NO_SCHEMA,
        "crd": crd,
        "custom": custom,
    });
    let mut failed = Vec::new();
    if let Err(e) = schemas(&request) {
        failed.push(format!("{e:#}"));
    }
    for file in &files {
        let rel = file.strip_prefix(root()).unwrap_or(file);
        let status = Command::new(agent)
            .args(["check", "--config", AGENT_CONFIG, "--policy"])
            .arg(rel)
            .current_dir(root())
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", agent.display()))?;
        if status.success() {
            println!("manifests: {} passes mesh-agent check", rel.display());
        } else {
            failed.push(format!(
                "{}: mesh-agent check failed (above)",
                rel.display()
            ));
        }
    }
    if !failed.is_empty() {
        bail!("manifests are not valid:\n  {}", failed.join("\n  "));
    }
    println!(
        "manifests: {} rendered object(s), {} example MeshPolicy(s), {} example file(s) valid in {:.1} s",
        objects.len(),
        custom.len(),
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `manifests.py` with the pinned Python packages.
fn schemas(request: &Value) -> anyhow::Result<()> {
    let mut child = Command::new(setup::python())
        .args(["-c", CHECKER])
        .stdin(Stdio::piped())
        .spawn()
        .context("running the Python schema checker (cargo xtask setup installs it)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(request)?.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("schema validation failed (problems above)");
    }
    Ok(())
}

/// The documents of a multi-document YAML text with their 1-based index (as `mesh-agent check`
/// counts them), empty ones left out.
fn documents(text: &str, source: &str) -> anyhow::Result<Vec<(usize, Value)>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(doc).with_context(|| format!("{source}#{}: not YAML", i + 1))?;
        if !value.is_null() {
            out.push((i + 1, value));
        }
    }
    Ok(out)
}
