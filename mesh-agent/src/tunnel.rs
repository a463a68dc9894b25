//! The HTTP proxy's two meeting points with the mTLS tunnel.
//!
//! - Sending: [`Dialer`] tells the HTTP proxy which endpoints its requests reach through the
//!   tunnel (an enrolled pod of another node, for a client pod of this node, as [`Mesh::target`]
//!   decides for the L4 path) and opens the tunnel streams, as the client's identity. The
//!   proxy pools them by that identity.
//! - Receiving: [`deliver_gated`] serves a tunneled connection whose requests the policy's HTTP
//!   deny rules may refuse for the source identity that only this end knows: it looks at the
//!   first bytes, and HTTP goes through [`mesh_http::Proxy::serve_tunneled`] while anything
//!   else is relayed to the pod as bytes.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_inspect::{Detection, detect};
use mesh_policy::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tracing::debug;

use crate::mesh::{Mesh, Target};
use crate::policy::Store;

/// The first bytes read to tell HTTP from anything else, at most.
const MAX_INSPECT_LEN: usize = 16 * 1024;

/// The HTTP proxy's dialer: the mTLS tunnel for the endpoints [`Mesh::target`] names. Made
/// before the mesh starts (the proxy is built first); routes nothing until it has.
#[derive(Debug)]
pub struct Dialer {
    pub mesh: Arc<OnceLock<Arc<Mesh>>>,
    pub policy: Store,
}

impl mesh_http::Dialer for Dialer {
    fn route(&self, src: SocketAddr, endpoint: SocketAddr) -> Option<mesh_http::Route> {
        let mesh = self.mesh.get()?;
        let target = mesh.target(&self.policy.current(), src.ip(), endpoint)?;
        // The pools key on it: a stream opened as one identity is reused only for clients of
        // that identity, towards the same destination identity and node.
        let key = format!("{} {} {}", target.src_id, target.dst_id, target.peer);
        Some(mesh_http::Route::new(
            key,
            Arc::new(TunnelDial {
                mesh: mesh.clone(),
                target,
            }),
        ))
    }
}

/// Opens tunnel streams along one [`Target`].
struct TunnelDial {
    mesh: Arc<Mesh>,
    target: Target,
}

impl mesh_http::Dial for TunnelDial {
    fn dial(&self, endpoint: SocketAddr) -> mesh_http::Dialing {
        let mesh = self.mesh.clone();
        let target = self.target.clone();
        // A refusal by the peer's policy comes back as PermissionDenied (`Mesh::connect`),
        // which the proxy answers 403 without holding the endpoint at fault.
        Box::pin(async move {
            let stream = mesh.connect(&target, endpoint).await?;
            Ok(Box::new(stream) as mesh_http::BoxedIo)
        })
    }
}

/// Serves a tunneled connection, already allowed at L4, whose HTTP requests the policy may
/// deny by `source`: `client` is the tunnel's side, `pod` the connection to the destination.
///
/// Whoever sends first decides: an HTTP server never speaks first, so the client's first bytes
/// are waited for (up to `idle`) unless the pod speaks first (a server-first protocol, relayed
/// as is). A client cannot slip HTTP requests past the check by sending its first bytes late,
/// and a server-first protocol pays no detection delay.
pub async fn deliver_gated(
    mut client: DuplexStream,
    mut pod: TcpStream,
    http: mesh_http::Proxy,
    source: Option<Identity>,
    tunnel_src: SocketAddr,
    dst: SocketAddr,
    idle: Duration,
) {
    let deadline = tokio::time::Instant::now() + idle;
    let mut prefix = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let detection = loop {
        match detect(&prefix) {
            Detection::NeedMore if prefix.len() < MAX_INSPECT_LEN => {}
            Detection::NeedMore => break Detection::Opaque,
            detection => break detection,
        }
        let room = (MAX_INSPECT_LEN - prefix.len()).min(chunk.len());
        tokio::select! {
            read = client.read(&mut chunk[..room]) => match read {
                Ok(0) | Err(_) if prefix.is_empty() => return,
                Ok(0) | Err(_) => break Detection::Opaque,
                Ok(n) => prefix.extend_from_slice(&chunk[..n]),
            },
            // Only before the client said anything: afterwards the pod waits for the rest.
            ready = pod.readable(), if prefix.is_empty() => {
                if ready.is_err() {
                    return;
                }
                break Detection::Opaque;
            }
            () = tokio::time::sleep_until(deadline) => {
                debug!(%dst, "tunneled connection idle before its first bytes; closed");
                return;
            }
        }
    };
    match detection {
        Detection::Http1(_) | Detection::H2PriorKnowledge => {
            let h2 = matches!(detection, Detection::H2PriorKnowledge);
            if let Err(error) = http
                .serve_tunneled(client, prefix, h2, source, tunnel_src, dst, pod)
                .await
            {
                debug!(%dst, %error, "tunneled HTTP connection ended");
            }
        }
        _ => {
            if !prefix.is_empty() && pod.write_all(&prefix).await.is_err() {
                return;
            }
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut pod).await {
                debug!(%dst, %error, "tunneled connection ended");
            }
        }
    }
}
