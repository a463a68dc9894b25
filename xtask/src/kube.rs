//! Kubernetes pieces shared by the demo and the conformance run in Kubernetes mode: the test API
//! server (`mesh-apiserver`) on loopback, the real `kubectl` against it, and Pod objects as a
//! kubelet would have reported them (status written through `/status`).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
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
    /// Where it listens (127.0.0.1 in its network namespace).
    addr: SocketAddr,
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
        let addr = match read {
            Some(Ok(n)) if n > 0 => line.trim().parse(),
            _ => "".parse(),
        };
        let Ok(addr) = addr else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!(
                "{} exited ({status}) without printing its address: {line:?}",
                bin.display()
            );
        };
        Ok(ApiServer {
            child,
            addr,
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

    /// One request straight to the API server, without kubectl, for set-up steps that must be
    /// quick; it must run in the server's network namespace. `body` is sent as JSON with
    /// `content_type`. The answer's status code and JSON.
    fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let body = body.to_string();
        let mut s = TcpStream::connect(self.addr)
            .with_context(|| format!("connecting to the API server at {}", self.addr))?;
        // HTTP/1.0: the answer ends when the server closes, never chunked.
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, answer) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("{method} {path}: not an HTTP answer: {head:?}"))?;
        Ok((code, serde_json::from_str(answer).unwrap_or_default()))
    }

    /// [`call`](Self::call) that fails unless the answer is a success.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let (code, answer) = self.call(method, path, content_type, body)?;
        if !(200..300).contains(&code) {
            bail!(
                "{method} {path}: {code} {}",
                answer["message"].as_str().unwrap_or_default()
            );
        }
        Ok(answer)
    }

    /// POSTs `object` to `collection`; one that already exists (409) is left as it is.
    pub fn create(&self, collection: &str, object: &serde_json::Value) -> anyhow::Result<()> {
        let (code, answer) = self.call("POST", collection, "application/json", object)?;
        if code != 409 && !(200..300).contains(&code) {
            bail!(
                "POST {collection}: {code} {}",
                answer["message"].as_str().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// [`create`](Self::create)s every object in these manifest files in `collection`.
    pub fn create_all(&self, collection: &str, files: &[PathBuf]) -> anyhow::Result<()> {
        for file in files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let object = <serde_json::Value as serde::Deserialize>::deserialize(doc)
                    .with_context(|| format!("parsing {}", file.display()))?;
                if !object.is_null() {
                    self.create(collection, &object)?;
                }
            }
        }
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
/// Running, Ready, `podIP`. The API server drops status on create, so it is written through
/// `/status` afterwards, as a kubelet writes it.
pub fn running_status(ip: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }})
}

/// [`running_status`] written with `kubectl patch --subresource=status`.
pub fn set_pod_running(
    api: &ApiServer,
    namespace: &str,
    name: &str,
    ip: Ipv4Addr,
) -> anyhow::Result<()> {
    api.kubectl(&[
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &running_status(ip).to_string(),
    ])?;
    Ok(())
}
