//! The endpoint registry shared by the HTTP proxy and the agent's TCP path, its one picker and
//! its ejection rules, and the HTTP retry budget.
//!
//! One registry: endpoint `ip:port` -> in-flight count (HTTP requests and TCP connections
//! alike), consecutive failures and ejection. An endpoint ejected because its HTTP answers
//! failed is skipped by TCP connections too, and one that refuses TCP connects is skipped by
//! HTTP requests. Picking is least-loaded power of two random choices (one random source:
//! [`random_u64`]) among endpoints not ejected; it takes one read lock and allocates nothing.
//! Consecutive failures eject an endpoint for a doubling time, never the last usable one of the
//! set it was picked from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crate::config::Resilience;
use crate::headers::random_u64;
use crate::io::now_ms;
use crate::stats::Stats;

/// Entries beyond which idle healthy endpoints are forgotten (endpoints come and go with
/// deployments, and a TCP destination that is no Service is an endpoint of its own).
const MAX_REMEMBERED: usize = 65_536;

/// What the agent knows about one endpoint `ip:port`, shared by every Service that has it and by
/// both the HTTP and the TCP path.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// HTTP requests sent and not finished (until the response body ends), plus TCP
    /// connections open.
    in_flight: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejected until this [`now_ms`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections so far (the next lasts `base * 2^ejections`); decays when healthy.
    ejections: AtomicU32,
}

impl EndpointState {
    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Requests and connections in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request or a connection in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    /// Starts counting.
    pub fn new(state: Arc<EndpointState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint registry with its picking and ejection rules. Cheap to clone: clones share it.
#[derive(Debug, Clone)]
pub struct Balancer {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    endpoints: RwLock<HashMap<SocketAddr, Arc<EndpointState>>>,
    resilience: Resilience,
}

/// Result of [`Balancer::pick`] and [`Balancer::pick_connection`].
#[derive(Debug)]
pub enum Pick {
    /// The endpoint to use and its shared state.
    Endpoint(SocketAddr, Arc<EndpointState>),
    /// No endpoint is left to try.
    Empty,
    /// Every endpoint left is ejected.
    AllEjected,
}

type Map = HashMap<SocketAddr, Arc<EndpointState>>;

impl Balancer {
    /// An empty registry applying `resilience`'s ejection rules.
    pub fn new(resilience: Resilience) -> Self {
        Self {
            inner: Arc::new(Registry {
                endpoints: RwLock::new(HashMap::new()),
                resilience,
            }),
        }
    }

    /// The retry and ejection settings.
    pub fn resilience(&self) -> &Resilience {
        &self.inner.resilience
    }

    fn read(&self) -> RwLockReadGuard<'_, Map> {
        self.inner
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The state of `endpoint`, created on first use.
    pub fn state(&self, endpoint: SocketAddr) -> Arc<EndpointState> {
        if let Some(state) = self.read().get(&endpoint) {
            return state.clone();
        }
        let mut map = self
            .inner
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() > MAX_REMEMBERED {
            let now = now_ms();
            map.retain(|_, s| Arc::strong_count(s) > 1 || s.in_flight() > 0 || s.is_ejected(now));
        }
        map.entry(endpoint).or_default().clone()
    }

    /// For an HTTP request: least-request P2C among the endpoints not ejected, preferring ones
    /// not in `tried` (a retry goes elsewhere when it can, and back to a tried one rather than
    /// to an ejected one).
    pub fn pick(&self, endpoints: &[SocketAddr], tried: &[SocketAddr]) -> Pick {
        if endpoints.is_empty() {
            return Pick::Empty;
        }
        let now = now_ms();
        let chosen = {
            let map = self.read();
            let healthy = |e: &SocketAddr| !map.get(e).is_some_and(|s| s.is_ejected(now));
            p2c(endpoints, &map, |e| healthy(e) && !tried.contains(e))
                .or_else(|| p2c(endpoints, &map, healthy))
                .map(|e| (e, map.get(&e).cloned()))
        };
        match chosen {
            Some((e, state)) => Pick::Endpoint(e, state.unwrap_or_else(|| self.state(e))),
            None => Pick::AllEjected,
        }
    }

    /// For a TCP connection: each connect attempt goes to an endpoint not in `tried`; among
    /// those, least-connections P2C over the ones not ejected, or over the ejected ones when
    /// nothing else is left (a connection has no status to answer with: trying beats refusing).
    pub fn pick_connection(&self, endpoints: &[SocketAddr], tried: &[SocketAddr]) -> Pick {
        let now = now_ms();
        let chosen = {
            let map = self.read();
            let fresh = |e: &SocketAddr| !tried.contains(e);
            p2c(endpoints, &map, |e| {
                fresh(e) && !map.get(e).is_some_and(|s| s.is_ejected(now))
            })
            .or_else(|| p2c(endpoints, &map, fresh))
            .map(|e| (e, map.get(&e).cloned()))
        };
        match chosen {
            Some((e, state)) => Pick::Endpoint(e, state.unwrap_or_else(|| self.state(e))),
            None => Pick::Empty,
        }
    }

    /// Records a success: a good HTTP answer (anything but a 5xx) or an established connection.
    pub fn success(&self, state: &EndpointState) {
        state.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure (5xx, connect failure, reset) and ejects the endpoint after enough in
    /// a row, unless no other endpoint of `siblings` would be left; true if it ejected it.
    pub fn record_failure(
        &self,
        endpoint: SocketAddr,
        state: &EndpointState,
        siblings: &[SocketAddr],
    ) -> bool {
        let resilience = &self.inner.resilience;
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < resilience.consecutive_failures {
            return false;
        }
        let now = now_ms();
        if state.is_ejected(now) {
            return false;
        }
        let others = {
            let map = self.read();
            siblings
                .iter()
                .filter(|e| **e != endpoint)
                .any(|e| !map.get(e).is_some_and(|s| s.is_ejected(now)))
        };
        if !others {
            return false;
        }
        let base = u64::try_from(resilience.base_ejection.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(resilience.max_ejection.as_millis()).unwrap_or(u64::MAX);
        let until = state.ejected_until.load(Ordering::Relaxed);
        let mut ejections = state.ejections.load(Ordering::Relaxed);
        if until != 0 && now.saturating_sub(until) > max {
            // Healthy for longer than the longest ejection: start over.
            ejections = 0;
        }
        let duration = base
            .saturating_mul(1u64 << ejections.min(20))
            .min(max.max(base));
        state
            .ejected_until
            .store(now.saturating_add(duration), Ordering::Relaxed);
        state.ejections.store(ejections + 1, Ordering::Relaxed);
        state.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(%endpoint, failures, ejected_ms = duration, "endpoint ejected after consecutive failures");
        true
    }

    /// [`Balancer::record_failure`] for the HTTP proxy, counting ejections in its [`Stats`].
    pub(crate) fn failure(
        &self,
        endpoint: SocketAddr,
        state: &EndpointState,
        siblings: &[SocketAddr],
        stats: &Stats,
    ) {
        if self.record_failure(endpoint, state, siblings) {
            stats.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Power of two random choices among the endpoints `eligible` accepts: two distinct random
/// candidates, the one with less in flight wins. Two passes over `endpoints`, no allocation.
fn p2c(
    endpoints: &[SocketAddr],
    map: &Map,
    eligible: impl Fn(&SocketAddr) -> bool,
) -> Option<SocketAddr> {
    let n = endpoints.iter().filter(|e| eligible(e)).count();
    if n <= 1 {
        return endpoints.iter().find(|e| eligible(e)).copied();
    }
    let r = random_u64();
    let a = (r % n as u64) as usize;
    let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
    if b >= a {
        b += 1;
    }
    let (mut first, mut second) = (None, None);
    for (i, e) in endpoints.iter().filter(|e| eligible(e)).enumerate() {
        if i == a {
            first = Some(*e);
        } else if i == b {
            second = Some(*e);
        }
    }
    let load = |e: &SocketAddr| map.get(e).map_or(0, |s| s.in_flight());
    match (first, second) {
        (Some(a), Some(b)) => Some(if load(&b) < load(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Retries may add at most a share of the request rate over a sliding window of one-second
/// buckets, with a floor of a few retries per second so that low traffic can still retry.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    buckets: Mutex<Vec<Bucket>>,
    percent: u64,
    min_per_window: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub(crate) fn new(resilience: &Resilience) -> Self {
        let seconds = resilience.retry_budget_window.as_secs().max(1);
        Self {
            buckets: Mutex::new(vec![Bucket::default(); seconds as usize]),
            percent: u64::from(resilience.retry_budget_percent),
            min_per_window: u64::from(resilience.retry_min_per_second) * seconds,
        }
    }

    fn with_current<R>(&self, f: impl FnOnce(&mut Vec<Bucket>, usize) -> R) -> Option<R> {
        let second = now_ms() / 1000;
        let mut buckets = self.buckets.lock().ok()?;
        let len = buckets.len();
        let index = (second % len as u64) as usize;
        if buckets[index].second != second {
            buckets[index] = Bucket {
                second,
                ..Bucket::default()
            };
        }
        // Buckets older than the window no longer count.
        for bucket in buckets.iter_mut() {
            if second.saturating_sub(bucket.second) >= len as u64 {
                *bucket = Bucket::default();
            }
        }
        Some(f(&mut buckets, index))
    }

    /// Counts an original request.
    pub(crate) fn request(&self) {
        self.with_current(|buckets, i| buckets[i].requests += 1);
    }

    /// Takes a retry from the budget if one is left.
    pub(crate) fn try_retry(&self) -> bool {
        let percent = self.percent;
        let floor = self.min_per_window;
        self.with_current(|buckets, i| {
            let requests: u64 = buckets.iter().map(|b| b.requests).sum();
            let retries: u64 = buckets.iter().map(|b| b.retries).sum();
            let allowed = (requests * percent / 100).max(floor);
            if retries < allowed {
                buckets[i].retries += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
            .collect()
    }

    fn picked(p: Pick) -> SocketAddr {
        match p {
            Pick::Endpoint(e, _) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn p2c_prefers_less_loaded() {
        let b = Balancer::new(Resilience::default());
        let eps = addrs(2);
        let busy = b.state(eps[0]);
        let _load: Vec<InFlight> = (0..5).map(|_| InFlight::new(busy.clone())).collect();
        for _ in 0..50 {
            assert_eq!(picked(b.pick(&eps, &[])), eps[1]);
            assert_eq!(picked(b.pick_connection(&eps, &[])), eps[1]);
        }
        // Retries avoid the endpoint already tried.
        assert_eq!(picked(b.pick(&eps, &[eps[1]])), eps[0]);
    }

    #[test]
    fn picks_spread_over_idle_endpoints_and_the_busiest_never_wins() {
        let b = Balancer::new(Resilience::default());
        let eps = addrs(4);
        let mut hits: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..4000 {
            *hits.entry(picked(b.pick(&eps, &[]))).or_default() += 1;
        }
        assert_eq!(hits.len(), 4);
        assert!(hits.values().all(|&n| n > 600), "{hits:?}");
        // The two candidates are always distinct, so the one busiest endpoint never wins.
        let _load: Vec<InFlight> = (0..3).map(|_| InFlight::new(b.state(eps[3]))).collect();
        assert!((0..1000).all(|_| picked(b.pick(&eps, &[])) != eps[3]));
    }

    #[test]
    fn the_picker_tiers_fall_back_as_each_path_needs() {
        let b = Balancer::new(Resilience::default());
        assert!(matches!(b.pick(&[], &[]), Pick::Empty));
        assert!(matches!(b.pick_connection(&[], &[]), Pick::Empty));
        let eps = addrs(3);
        // Every endpoint tried: HTTP may go back to one; TCP has nowhere left.
        assert!(matches!(b.pick(&eps, &eps), Pick::Endpoint(..)));
        assert!(matches!(b.pick_connection(&eps, &eps), Pick::Empty));
        assert_eq!(picked(b.pick_connection(&eps, &eps[..2])), eps[2]);
    }

    #[test]
    fn ejection_never_takes_the_last_endpoint() {
        let res = Resilience {
            base_ejection: Duration::from_secs(60),
            ..Resilience::default()
        };
        let b = Balancer::new(res);
        let stats = Stats::default();
        let eps = addrs(2);
        let s0 = b.state(eps[0]);
        let s1 = b.state(eps[1]);
        for _ in 0..5 {
            b.failure(eps[0], &s0, &eps, &stats);
        }
        assert!(s0.is_ejected(now_ms()));
        for _ in 0..10 {
            b.failure(eps[1], &s1, &eps, &stats);
        }
        assert!(!s1.is_ejected(now_ms()));
        assert!(matches!(b.pick(&eps, &[]), Pick::Endpoint(e, _) if e == eps[1]));
        assert!(matches!(b.pick(&eps[..1], &[]), Pick::AllEjected));
        assert_eq!(stats.ejections.load(Ordering::Relaxed), 1);
        // A connection to the ejected endpoint alone is still tried: nothing else is left.
        assert_eq!(picked(b.pick_connection(&eps[..1], &[])), eps[0]);
        assert_eq!(picked(b.pick_connection(&eps, &[eps[1]])), eps[0]);
    }

    #[test]
    fn clones_share_one_registry() {
        let b = Balancer::new(Resilience::default());
        let tcp = b.clone();
        let eps = addrs(3);
        let s = tcp.state(eps[0]);
        for _ in 0..Resilience::default().consecutive_failures {
            tcp.record_failure(eps[0], &s, &eps);
        }
        for _ in 0..100 {
            assert_ne!(picked(b.pick(&eps, &[])), eps[0]);
        }
        let _conn = InFlight::new(tcp.state(eps[1]));
        assert_eq!(b.state(eps[1]).in_flight(), 1);
    }

    #[test]
    fn a_success_resets_the_failure_run() {
        let b = Balancer::new(Resilience::default());
        let eps = addrs(2);
        let s = b.state(eps[0]);
        for _ in 0..20 {
            for _ in 1..Resilience::default().consecutive_failures {
                assert!(!b.record_failure(eps[0], &s, &eps));
            }
            b.success(&s);
        }
        assert!(!s.is_ejected(now_ms()));
    }

    #[test]
    fn budget_has_a_floor_and_a_ratio() {
        let res = Resilience {
            retry_budget_percent: 20,
            retry_min_per_second: 1,
            retry_budget_window: Duration::from_secs(10),
            ..Resilience::default()
        };
        let budget = RetryBudget::new(&res);
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 10);
        for _ in 0..100 {
            budget.request();
        }
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 10, "20% of 100 requests = 20 in total");
    }
}
