//! Endpoint choice and health: least-request power-of-two-choices over in-flight counts,
//! passive outlier detection (consecutive failures eject an endpoint for a doubling time, never
//! the last usable one), and the retry budget.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::Resilience;
use crate::headers::random_u64;
use crate::io::now_ms;
use crate::stats::Stats;

/// What the proxy knows about one endpoint `ip:port`, shared by every Service that has it.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    /// Requests sent and not finished (until the response body ends).
    pub in_flight: AtomicU64,
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
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub(crate) fn new(state: Arc<EndpointState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint table and the balancing and ejection rules.
#[derive(Debug)]
pub(crate) struct Balancer {
    endpoints: RwLock<HashMap<SocketAddr, Arc<EndpointState>>>,
    resilience: Resilience,
}

/// Result of [`Balancer::pick`].
#[derive(Debug)]
pub(crate) enum Pick {
    Endpoint(SocketAddr, Arc<EndpointState>),
    /// The backend has no endpoints at all.
    Empty,
    /// Every endpoint is ejected.
    AllEjected,
}

impl Balancer {
    pub(crate) fn new(resilience: Resilience) -> Self {
        Self {
            endpoints: RwLock::new(HashMap::new()),
            resilience,
        }
    }

    pub(crate) fn resilience(&self) -> &Resilience {
        &self.resilience
    }

    fn state(&self, endpoint: SocketAddr) -> Arc<EndpointState> {
        if let Ok(map) = self.endpoints.read()
            && let Some(state) = map.get(&endpoint)
        {
            return state.clone();
        }
        match self.endpoints.write() {
            Ok(mut map) => {
                if map.len() > 65_536 {
                    // Endpoints come and go with deployments; forget idle healthy ones.
                    let now = now_ms();
                    map.retain(|_, s| {
                        Arc::strong_count(s) > 1
                            || s.in_flight.load(Ordering::Relaxed) > 0
                            || s.is_ejected(now)
                    });
                }
                map.entry(endpoint).or_default().clone()
            }
            Err(_) => Arc::new(EndpointState::default()),
        }
    }

    /// Picks an endpoint by least-request power of two choices among those not ejected,
    /// preferring ones not in `tried` (retries go elsewhere when they can).
    pub(crate) fn pick(&self, endpoints: &[SocketAddr], tried: &[SocketAddr]) -> Pick {
        if endpoints.is_empty() {
            return Pick::Empty;
        }
        let now = now_ms();
        let states: Vec<(SocketAddr, Arc<EndpointState>)> = endpoints
            .iter()
            .map(|e| (*e, self.state(*e)))
            .filter(|(_, s)| !s.is_ejected(now))
            .collect();
        if states.is_empty() {
            return Pick::AllEjected;
        }
        let fresh: Vec<&(SocketAddr, Arc<EndpointState>)> =
            states.iter().filter(|(e, _)| !tried.contains(e)).collect();
        let pool: Vec<&(SocketAddr, Arc<EndpointState>)> = if fresh.is_empty() {
            states.iter().collect()
        } else {
            fresh
        };
        let chosen = match pool.len() {
            1 => pool[0],
            n => {
                let r = random_u64();
                let a = (r % n as u64) as usize;
                let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let load = |i: usize| pool[i].1.in_flight.load(Ordering::Relaxed);
                if load(b) < load(a) { pool[b] } else { pool[a] }
            }
        };
        Pick::Endpoint(chosen.0, chosen.1.clone())
    }

    /// Records a good answer (anything but a 5xx).
    pub(crate) fn success(&self, state: &EndpointState) {
        state.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure (5xx, connect failure, reset); ejects the endpoint after enough in a
    /// row unless no other endpoint of `siblings` would be left.
    pub(crate) fn failure(
        &self,
        endpoint: SocketAddr,
        state: &EndpointState,
        siblings: &[SocketAddr],
        stats: &Stats,
    ) {
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.resilience.consecutive_failures {
            return;
        }
        let now = now_ms();
        if state.is_ejected(now) {
            return;
        }
        let others = siblings
            .iter()
            .filter(|e| **e != endpoint)
            .any(|e| !self.state(*e).is_ejected(now));
        if !others {
            return;
        }
        let base = u64::try_from(self.resilience.base_ejection.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.resilience.max_ejection.as_millis()).unwrap_or(u64::MAX);
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
        stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%endpoint, failures, ejected_ms = duration, "ejecting endpoint");
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

    #[test]
    fn p2c_prefers_less_loaded() {
        let b = Balancer::new(Resilience::default());
        let eps = addrs(2);
        let busy = b.state(eps[0]);
        let _load: Vec<InFlight> = (0..5).map(|_| InFlight::new(busy.clone())).collect();
        for _ in 0..50 {
            match b.pick(&eps, &[]) {
                Pick::Endpoint(e, _) => assert_eq!(e, eps[1]),
                other => panic!("{other:?}"),
            }
        }
        // Retries avoid the endpoint already tried.
        match b.pick(&eps, &[eps[1]]) {
            Pick::Endpoint(e, _) => assert_eq!(e, eps[0]),
            other => panic!("{other:?}"),
        }
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
