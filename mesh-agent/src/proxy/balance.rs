//! Connecting a TCP connection to one of its endpoints through the endpoint registry the HTTP
//! proxy uses too ([`mesh_http::Balancer`]): the same least-loaded P2C picker, the same
//! in-flight counts and the same ejections, so an endpoint the HTTP proxy ejected is skipped
//! here and one that refuses connects here is skipped by HTTP requests. Each attempt moves on
//! to an endpoint not tried yet.
use std::{net::SocketAddr, time::Duration};

use mesh_http::{InFlight, Pick};
use tokio::net::{TcpSocket, TcpStream};

/// The agent's view of its endpoints: the HTTP proxy's registry.
#[derive(Debug, Clone)]
pub struct Balancer {
    registry: mesh_http::Balancer,
}

/// Holds one in-flight count on an endpoint until the connection is dropped.
pub type Lease = InFlight;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no endpoints")]
    NoEndpoints,
    /// The agent could not open a socket for the upstream side (its own or the system's fd
    /// limit): no endpoint is at fault, and none was tried further.
    #[error("no socket for the upstream connection: {0}")]
    OutOfFds(std::io::Error),
    /// The destination's agent refused the connection by policy (mTLS tunnel): no endpoint is
    /// at fault, and none other was tried.
    #[error("{0}")]
    Denied(std::io::Error),
    #[error("{attempts} connect attempt(s) failed, last to {last}: {error}")]
    Failed {
        attempts: usize,
        last: SocketAddr,
        error: std::io::Error,
    },
}

impl Balancer {
    /// Connects through `registry`, shared with the HTTP proxy ([`mesh_http::Proxy::balancer`]).
    pub fn new(registry: mesh_http::Balancer) -> Self {
        Balancer { registry }
    }

    /// Connects to one of `eps`, trying up to `attempts` different endpoints.
    pub async fn connect(
        &self,
        eps: &[SocketAddr],
        timeout: Duration,
        attempts: usize,
    ) -> Result<(TcpStream, SocketAddr, Lease), ConnectError> {
        self.connect_with(eps, attempts, |ep| connect(ep, timeout))
            .await
    }

    /// [`Balancer::connect`] with another way to reach an endpoint (the mTLS tunnel).
    pub async fn connect_with<S, F, Fut>(
        &self,
        eps: &[SocketAddr],
        attempts: usize,
        mut dial: F,
    ) -> Result<(S, SocketAddr, Lease), ConnectError>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<S>>,
    {
        let mut tried = Vec::new();
        let mut last = None;
        while tried.len() < attempts.max(1) {
            let Pick::Endpoint(ep, state) = self.registry.pick_connection(eps, &tried) else {
                break;
            };
            tried.push(ep);
            let lease = InFlight::new(state.clone());
            match dial(ep).await {
                Ok(stream) => {
                    self.registry.success(&state);
                    return Ok((stream, ep, lease));
                }
                Err(e) if out_of_fds(&e) => return Err(ConnectError::OutOfFds(e)),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(ConnectError::Denied(e));
                }
                Err(e) => {
                    self.registry.record_failure(ep, &state, eps);
                    tracing::debug!(endpoint = %ep, error = %e, "connect failed; trying another endpoint");
                    last = Some((ep, e));
                }
            }
        }
        match last {
            Some((last, error)) => Err(ConnectError::Failed {
                attempts: tried.len(),
                last,
                error,
            }),
            None => Err(ConnectError::NoEndpoints),
        }
    }
}

/// Whether an error is the agent's (EMFILE) or the system's (ENFILE) fd limit.
pub fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(n) if n == nix::errno::Errno::EMFILE as i32 || n == nix::errno::Errno::ENFILE as i32
    )
}

/// One connect attempt with a timeout.
pub async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if super::headroom::reached(&sock) {
        return Err(super::headroom::out_of_fds());
    }
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn registry() -> mesh_http::Balancer {
        mesh_http::Balancer::new(mesh_http::Resilience::default())
    }

    /// An address on loopback where nothing listens: connecting is refused at once.
    fn dead() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn connect_moves_on_from_a_dead_endpoint() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let b = Balancer::new(registry());
        let eps = [dead(), live.local_addr().expect("addr")];
        for _ in 0..10 {
            let (_s, ep, _lease) = b
                .connect(&eps, Duration::from_secs(2), 2)
                .await
                .expect("connects");
            assert_eq!(ep, eps[1]);
        }
    }

    #[tokio::test]
    async fn connections_spread_by_least_connections() {
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let b = Balancer::new(registry());
        let eps = [
            l1.local_addr().expect("addr"),
            l2.local_addr().expect("addr"),
        ];
        // Connections held open: each new one goes to the endpoint with fewer.
        let mut held = Vec::new();
        let mut hits: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..20 {
            let (s, ep, lease) = b
                .connect(&eps, Duration::from_secs(2), 1)
                .await
                .expect("connects");
            *hits.entry(ep).or_default() += 1;
            held.push((s, lease));
        }
        assert_eq!(hits.values().copied().collect::<Vec<_>>(), vec![10, 10]);
    }

    /// One registry for both paths: failures the HTTP proxy records (5xx answers) eject an
    /// endpoint for TCP connections, and connect failures on the TCP path eject it for HTTP
    /// requests.
    #[tokio::test]
    async fn an_endpoint_ejected_on_one_path_is_skipped_on_the_other() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let live2 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = mesh_http::Proxy::new(
            mesh_http::Config::default(),
            std::sync::Arc::new(mesh_policy::PolicyStore::new(mesh_policy::Compiled::empty())),
        );
        let registry = http.balancer();
        let tcp = Balancer::new(registry.clone());
        let failures = registry.resilience().consecutive_failures;

        // HTTP -> TCP: the first endpoint answers 5xx until ejected.
        let eps = [
            live.local_addr().expect("addr"),
            live2.local_addr().expect("addr"),
        ];
        let bad = registry.state(eps[0]);
        for _ in 0..failures {
            registry.record_failure(eps[0], &bad, &eps);
        }
        for _ in 0..20 {
            let (_s, ep, _lease) = tcp
                .connect(&eps, Duration::from_secs(2), 1)
                .await
                .expect("connects");
            assert_eq!(
                ep, eps[1],
                "a TCP connection went to an endpoint HTTP ejected"
            );
        }

        // TCP -> HTTP: connects to a dead endpoint fail until it is ejected (beside one that
        // is not ejected: the last usable endpoint never is).
        let eps = [dead(), live2.local_addr().expect("addr")];
        let mut tcp_failures = 0;
        while tcp_failures < failures {
            // One attempt each, so that every connect to the dead one counts as a failure.
            if tcp.connect(&eps, Duration::from_secs(2), 1).await.is_err() {
                tcp_failures += 1;
            }
        }
        for _ in 0..100 {
            match registry.pick(&eps, &[]) {
                Pick::Endpoint(ep, _) => {
                    assert_eq!(
                        ep, eps[1],
                        "an HTTP request went to an endpoint TCP ejected"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
