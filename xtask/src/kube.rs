//! Kubernetes pieces shared by the demo and the conformance run in Kubernetes mode: the test API
//! server (`mesh-apiserver`) on loopback, the real `kubectl` against it, and Pod objects as a
//! kubelet would have reported them (status written through `/status`).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::util::root;

/// The Gateway API HTTPRoute CRD as released (standard channel, unmodified). A cluster installs
/// it before Skiff; it declares every field the conformance policies use (filters, query-param
/// matches, mirrors, timeouts), which the trimmed test fixture leaves out.
pub fn httproute_crd() -> PathBuf {
    root().join("tests/fixtures/gateway-api-v1.6.1-httproutes.yaml")
}

/// Our MeshPolicy CRD, as `cargo xtask crds` writes it.
pub fn meshpolicy_crd() -> PathBuf {
    root().join("manifests/crds/meshpolicy.yaml")
}

/// A running `mesh-apiserver` on 127.0.0.1 and the kubeconfig that reaches it; stopped on drop.
pub struct ApiServer {
    child: Child,
    pub kubeconfig: PathBuf,
    /// The network namespace it runs in (`None`: this process's own).
    netns: Option<String>,
}

impl ApiServer {
    /// Starts `bin` on a free loopback port in `netns` and waits until it listens. Its stderr
    /// goes to `log`. It is started with a parent-death signal (`setpriv --pdeathsig KILL`), so
    /// it cannot outlive the thread that started it, even when that process is SIGKILLed: call
    /// this from the main thread.
    pub fn start(
        bin: &Path,
        netns: Option<&str>,
        kubeconfig: &Path,
        log: Stdio,
    ) -> anyhow::Result<ApiServer> {
        let mut cmd = in_netns(netns, "setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // The first stdout line is the bound address, printed once the socket listens and the
        // kubeconfig is written.
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        if !matches!(read, Some(Ok(n)) if n > 0) {
            let _ = child.kill();
            let status = child.wait()?;
            bail!(
                "{} exited ({status}) without printing its address",
                bin.display()
            );
        }
        Ok(ApiServer {
            child,
            kubeconfig: kubeconfig.to_path_buf(),
            netns: netns.map(str::to_string),
        })
    }

    /// `kubectl ARGS` against this server with `stdin` piped in; its stdout, or an error with
    /// its stderr.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        let mut child = in_netns(self.netns.as_deref(), "kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // Beside the kubeconfig: every server has a new port, and kubectl would otherwise
            // leave a discovery cache per port in ~/.kube/cache.
            .arg("--cache-dir")
            .arg(self.kubeconfig.with_extension("cache"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl (1.32 on PATH)")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl ARGS` against this server.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, "")
    }

    /// `kubectl apply -f -` of these manifests.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// The CRDs a cluster running Skiff has, created in this fresh API server: Gateway API's
    /// HTTPRoute and our MeshPolicy. `create` rather than `apply`: nothing is there to merge
    /// with, and server-side apply's field bookkeeping over the 430 KB HTTPRoute schema costs
    /// the debug-built API server 300 ms (client-side apply is no option: the CRD is larger than
    /// the `last-applied-configuration` annotation may be). The test API server establishes a
    /// CRD as it creates it, so its kinds are served when this returns.
    pub fn create_crds(&self) -> anyhow::Result<()> {
        let (gateway, mesh) = (httproute_crd(), meshpolicy_crd());
        self.kubectl(&["create", "-f", path_str(&gateway)?, "-f", path_str(&mesh)?])?;
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program` run in `netns` (`ip netns exec`), or here.
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A Pod object on `node`, as the scheduler would have bound it.
pub fn pod_manifest(namespace: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{}}}}}\n\
         spec:\n  nodeName: {node}\n  containers: [{{name: app, image: app}}]\n",
        labels.join(", ")
    )
}

/// What the kubelet reports once the pod's sandbox has `ip` and its container is ready:
/// Running, Ready, `podIP`. The API server drops status on create, so it goes through
/// `/status`, as a kubelet writes it.
pub fn set_pod_running(
    api: &ApiServer,
    namespace: &str,
    name: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let status = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    api.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    Ok(())
}
