//! Choosing an endpoint and connecting to it: least-connections with the power of two random
//! choices, passive outlier ejection after consecutive connect failures, and connect retries that
//! move on to another endpoint.
use std::{
    cell::Cell,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, TcpStream};

/// Consecutive connect failures that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// How long an ejected endpoint is skipped (doubling per ejection, capped).
const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(60);

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let t = Instant::now().elapsed().as_nanos() as u64;
        let id = std::thread::current().id();
        let h = format!("{id:?}").bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        (t ^ h ^ std::process::id() as u64) | 1
    });
}

/// A fast, non-cryptographic random number (xorshift64*), per thread.
pub fn random_u32() -> u32 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    })
}

/// Per-endpoint state shared by all connections.
#[derive(Debug, Default)]
pub struct EndpointState {
    pub active: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the registry's epoch until which the endpoint is skipped.
    ejected_until_ms: AtomicU64,
}

/// All endpoints the agent has connected to.
#[derive(Debug)]
pub struct Balancer {
    epoch: Instant,
    endpoints: RwLock<HashMap<SocketAddr, Arc<EndpointState>>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            epoch: Instant::now(),
            endpoints: RwLock::default(),
        }
    }
}

/// Holds one active-connection count on an endpoint until dropped.
#[derive(Debug)]
pub struct Lease(Arc<EndpointState>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no endpoints")]
    NoEndpoints,
    #[error("{attempts} connect attempt(s) failed, last to {last}: {error}")]
    Failed {
        attempts: usize,
        last: SocketAddr,
        error: std::io::Error,
    },
}

impl Balancer {
    fn state(&self, ep: SocketAddr) -> Arc<EndpointState> {
        if let Some(s) = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ep)
        {
            return s.clone();
        }
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ep)
            .or_default()
            .clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn ejected(&self, s: &EndpointState) -> bool {
        s.ejected_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Picks an endpoint not in `tried`: two random candidates, the one with fewer active
    /// connections wins; ejected endpoints are avoided unless nothing else is left.
    pub fn pick(&self, eps: &[SocketAddr], tried: &[SocketAddr]) -> Option<SocketAddr> {
        let fresh: Vec<SocketAddr> = eps.iter().copied().filter(|e| !tried.contains(e)).collect();
        let healthy: Vec<SocketAddr> = fresh
            .iter()
            .copied()
            .filter(|e| !self.ejected(&self.state(*e)))
            .collect();
        let pool = if healthy.is_empty() { &fresh } else { &healthy };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let a = pool[random_u32() as usize % n];
                let mut b = pool[random_u32() as usize % (n - 1)];
                if b == a {
                    b = pool[n - 1];
                }
                let load = |e: SocketAddr| self.state(e).active.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    fn record(&self, ep: SocketAddr, ok: bool) {
        let s = self.state(ep);
        if ok {
            s.consecutive_failures.store(0, Ordering::Relaxed);
            s.ejections.store(0, Ordering::Relaxed);
            return;
        }
        if s.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER {
            s.consecutive_failures.store(0, Ordering::Relaxed);
            let n = s.ejections.fetch_add(1, Ordering::Relaxed).min(4);
            let backoff = (EJECT_BASE * 2u32.pow(n)).min(EJECT_MAX);
            s.ejected_until_ms.store(
                self.now_ms() + backoff.as_millis() as u64,
                Ordering::Relaxed,
            );
            tracing::warn!(endpoint = %ep, ?backoff, "endpoint ejected after consecutive connect failures");
        }
    }

    /// Connects to one of `eps`, trying up to `attempts` different endpoints.
    pub async fn connect(
        &self,
        eps: &[SocketAddr],
        timeout: Duration,
        attempts: usize,
    ) -> Result<(TcpStream, SocketAddr, Lease), ConnectError> {
        let mut tried = Vec::new();
        let mut last = None;
        while tried.len() < attempts.max(1) {
            let Some(ep) = self.pick(eps, &tried) else {
                break;
            };
            tried.push(ep);
            let s = self.state(ep);
            s.active.fetch_add(1, Ordering::Relaxed);
            let lease = Lease(s);
            match connect(ep, timeout).await {
                Ok(stream) => {
                    self.record(ep, true);
                    return Ok((stream, ep, lease));
                }
                Err(e) => {
                    self.record(ep, false);
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

/// One connect attempt with a timeout.
pub async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
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

    fn eps(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 80)))
            .collect()
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let b = Balancer::default();
        let e = eps(2);
        b.state(e[0]).active.store(10, Ordering::Relaxed);
        for _ in 0..100 {
            assert_eq!(b.pick(&e, &[]), Some(e[1]));
        }
    }

    #[test]
    fn picks_spread_over_idle_endpoints() {
        let b = Balancer::default();
        let e = eps(4);
        let mut hits = HashMap::new();
        for _ in 0..4000 {
            *hits.entry(b.pick(&e, &[]).expect("some")).or_insert(0) += 1;
        }
        assert_eq!(hits.len(), 4);
        assert!(hits.values().all(|&n| n > 600), "{hits:?}");
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_none_is_left() {
        let b = Balancer::default();
        let e = eps(2);
        for _ in 0..EJECT_AFTER {
            b.record(e[0], false);
        }
        for _ in 0..50 {
            assert_eq!(b.pick(&e, &[]), Some(e[1]));
        }
        assert_eq!(
            b.pick(&e, &[e[1]]),
            Some(e[0]),
            "an ejected endpoint beats none"
        );
    }

    #[tokio::test]
    async fn connect_moves_on_from_a_dead_endpoint() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let b = Balancer::default();
        let eps = [dead, live.local_addr().expect("addr")];
        for _ in 0..10 {
            let (_s, ep, _lease) = b
                .connect(&eps, Duration::from_secs(2), 2)
                .await
                .expect("connects");
            assert_eq!(ep, eps[1]);
        }
    }
}
