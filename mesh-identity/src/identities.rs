//! [`Identities`]: the certificates and keys of the identities a node serves, kept fresh.
//!
//! The caller adds the identities of the pods on its node and removes them when the last such pod
//! goes. Each identity gets an ECDSA P-256 key generated here (it never leaves the process) and a
//! certificate from the [`CertificateSource`]; a task per identity renews it once a share of its
//! lifetime has passed, with a new key each time. A failed renewal keeps serving the current
//! certificate and retries with exponential backoff, so a signer outage only matters if it
//! outlasts the remaining lifetime.
//!
//! Handshakes read the current certificate through [`ArcSwap`]: no lock, no await, and a
//! rotation never disturbs connections already established (TLS does not look at the
//! certificate again after the handshake).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cert;
use crate::source::{CertificateRequest, CertificateSource, SourceError, rfc3339};
use crate::spiffe::SpiffeId;

/// Lifetime asked for each workload certificate: short, so a leaked key is worth little, and
/// long enough that a signer outage of hours does not break the mesh.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Renew once this share of the lifetime has passed (the other half is the margin for retries).
pub const DEFAULT_ROTATE_AT: f64 = 0.5;
/// First wait after a failed renewal.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between renewal attempts.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);

/// How certificates are requested and renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitiesConfig {
    /// Lifetime asked for each certificate (the source may shorten it).
    pub lifetime: Duration,
    /// Share of a certificate's lifetime after which it is renewed, strictly between 0 and 1.
    pub rotate_at: f64,
    /// First wait after a failed renewal; doubled after each failure.
    pub retry_initial: Duration,
    /// Cap on the wait between renewal attempts.
    pub retry_max: Duration,
}

impl Default for IdentitiesConfig {
    fn default() -> Self {
        IdentitiesConfig {
            lifetime: DEFAULT_LIFETIME,
            rotate_at: DEFAULT_ROTATE_AT,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

/// A configuration field has an unusable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identities config: {field} {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl IdentitiesConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.lifetime.is_zero() {
            return err("lifetime", "must be more than zero");
        }
        if !(self.rotate_at > 0.0 && self.rotate_at < 1.0) {
            return err(
                "rotate_at",
                &format!("must be strictly between 0 and 1, got {}", self.rotate_at),
            );
        }
        if self.retry_initial.is_zero() {
            return err("retry_initial", "must be more than zero");
        }
        if self.retry_max < self.retry_initial {
            return err("retry_max", "must not be less than retry_initial");
        }
        Ok(())
    }
}

/// Getting a certificate for an identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The source could not issue it.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Generating the key or the CSR failed.
    #[error("cannot generate a key and CSR for {id}: {reason}")]
    Key {
        /// The identity.
        id: SpiffeId,
        /// Why.
        reason: String,
    },
    /// The source answered with a certificate that cannot be used for the identity.
    #[error("the certificate issued for {id} is unusable: {reason}")]
    BadCertificate {
        /// The identity.
        id: SpiffeId,
        /// Why.
        reason: String,
    },
}

/// The current certificate chain and key of one identity.
pub struct Credential {
    id: SpiffeId,
    key: Arc<CertifiedKey>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    issued_at: SystemTime,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The identity certified.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Chain and signing key, as rustls takes them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }

    /// The leaf's serial number in hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The leaf's notBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's notAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// How long after issuance this credential should be renewed.
    fn renew_after(&self, share: f64) -> Duration {
        let usable = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        usable.mul_f64(share)
    }
}

struct Entry {
    current: Arc<ArcSwap<Credential>>,
    rotate_now: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Removing an identity (or dropping `Identities`) stops its renewals.
        self.task.abort();
    }
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    config: IdentitiesConfig,
    entries: ArcSwap<HashMap<SpiffeId, Arc<Entry>>>,
    /// Serializes writers of `entries` (add/remove are rare; reads never take it).
    writers: Mutex<()>,
}

/// The node's identities and their current certificates. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Identities {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("config", &self.inner.config)
            .field("ids", &self.inner.entries.load().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Identities {
    /// Identities whose certificates come from `source`. Must be called inside a Tokio runtime
    /// when identities are added (each runs a renewal task).
    pub fn new(
        source: Arc<dyn CertificateSource>,
        config: IdentitiesConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Identities {
            inner: Arc::new(Inner {
                source,
                config,
                entries: ArcSwap::from_pointee(HashMap::new()),
                writers: Mutex::new(()),
            }),
        })
    }

    /// The source certificates come from.
    pub fn source(&self) -> &Arc<dyn CertificateSource> {
        &self.inner.source
    }

    /// Starts holding a certificate for `id`: issues the first one now and returns its error if
    /// that fails (nothing is added then; the caller decides when to try again). Adding an
    /// identity already held does nothing.
    pub async fn add(&self, id: SpiffeId) -> Result<(), IdentityError> {
        if self.inner.entries.load().contains_key(&id) {
            return Ok(());
        }
        let first = issue(&*self.inner.source, &id, self.inner.config.lifetime).await?;
        tracing::info!(%id, serial = %first.serial, not_after = %rfc3339(first.not_after), "identity certificate issued");

        // Poisoning only means another writer panicked between two statements that cannot
        // panic; the map itself is always consistent, so carry on.
        let _writer = self
            .inner
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = self.inner.entries.load_full();
        if entries.contains_key(&id) {
            // Another add won the race while we were signing; keep its certificate.
            return Ok(());
        }
        let current = Arc::new(ArcSwap::from_pointee(first));
        let rotate_now = Arc::new(Notify::new());
        let task = tokio::spawn(renew_loop(
            self.inner.source.clone(),
            self.inner.config.clone(),
            id.clone(),
            current.clone(),
            rotate_now.clone(),
        ));
        let mut next = HashMap::clone(&entries);
        next.insert(
            id,
            Arc::new(Entry {
                current,
                rotate_now,
                task,
            }),
        );
        self.inner.entries.store(Arc::new(next));
        Ok(())
    }

    /// Stops holding `id`: its renewals stop and new handshakes for it fail. Returns whether it
    /// was held.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        let _writer = self
            .inner
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = self.inner.entries.load_full();
        if !entries.contains_key(id) {
            return false;
        }
        let mut next = HashMap::clone(&entries);
        next.remove(id);
        self.inner.entries.store(Arc::new(next));
        true
    }

    /// The current credential of `id`, without locking: what a handshake presents.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Credential>> {
        self.inner
            .entries
            .load()
            .get(id)
            .map(|entry| entry.current.load_full())
    }

    /// Renews `id`'s certificate now instead of at its scheduled time (a CA change, a test).
    /// Returns whether `id` is held; the renewal itself happens in the background.
    pub fn rotate_now(&self, id: &SpiffeId) -> bool {
        match self.inner.entries.load().get(id) {
            Some(entry) => {
                entry.rotate_now.notify_one();
                true
            }
            None => false,
        }
    }

    /// Every held identity with its certificate's notAfter, for the expiry metric.
    pub fn expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        let mut out: Vec<_> = self
            .inner
            .entries
            .load()
            .iter()
            .map(|(id, entry)| (id.clone(), entry.current.load().not_after))
            .collect();
        out.sort();
        out
    }
}

/// Renews `current` forever: at the configured share of its lifetime, or when asked; on failure
/// keeps the current credential and retries with exponential backoff.
async fn renew_loop(
    source: Arc<dyn CertificateSource>,
    config: IdentitiesConfig,
    id: SpiffeId,
    current: Arc<ArcSwap<Credential>>,
    rotate_now: Arc<Notify>,
) {
    // Tokio's clock (not the wall clock) schedules renewals, so paused-time tests drive them.
    let mut due = tokio::time::Instant::now() + current.load().renew_after(config.rotate_at);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = rotate_now.notified() => {}
        }
        let mut backoff = config.retry_initial;
        loop {
            match issue(&*source, &id, config.lifetime).await {
                Ok(fresh) => {
                    tracing::info!(
                        %id,
                        serial = %fresh.serial,
                        not_after = %rfc3339(fresh.not_after),
                        "identity certificate renewed"
                    );
                    // Floored so that a certificate cut short by an expiring CA cannot make
                    // renewals spin.
                    let wait = fresh
                        .renew_after(config.rotate_at)
                        .max(config.retry_initial);
                    due = tokio::time::Instant::now() + wait;
                    current.store(Arc::new(fresh));
                    break;
                }
                Err(error) => {
                    tracing::warn!(
                        %id,
                        %error,
                        retry_in = ?backoff,
                        current_not_after = %rfc3339(current.load().not_after),
                        "identity certificate renewal failed; keeping the current one"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(config.retry_max);
                }
            }
        }
    }
}

/// Generates a key, asks the source to certify it, and checks what came back.
async fn issue(
    source: &dyn CertificateSource,
    id: &SpiffeId,
    lifetime: Duration,
) -> Result<Credential, IdentityError> {
    let key_err = |reason: String| IdentityError::Key {
        id: id.clone(),
        reason,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| key_err(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| key_err(e.to_string()))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| key_err(e.to_string()))?;
    let request = CertificateRequest::new(id.clone(), csr.der().clone(), lifetime);

    let issued_at = SystemTime::now();
    let issued = source.sign(&request).await?;

    let bad = |reason: String| IdentityError::BadCertificate {
        id: id.clone(),
        reason,
    };
    let leaf_der = issued
        .chain
        .first()
        .ok_or_else(|| bad("the chain is empty".into()))?;
    let leaf = cert::parse(leaf_der).map_err(bad)?;
    let got = cert::spiffe_id_of_parsed(&leaf).map_err(|e| bad(e.to_string()))?;
    if &got != id {
        return Err(bad(format!("it is for {got}")));
    }
    let (not_before, not_after) = cert::validity(&leaf);
    if not_after <= SystemTime::now() {
        return Err(bad(format!("it expired at {}", rfc3339(not_after))));
    }
    let serial = cert::serial_hex(&leaf);

    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key =
        rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8).map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(issued.chain, signing_key);
    // A source that certified some other key would make every handshake fail; say it here.
    certified
        .keys_match()
        .map_err(|e| bad(format!("it does not certify our key: {e}")))?;
    Ok(Credential {
        id: id.clone(),
        key: Arc::new(certified),
        serial,
        not_before,
        not_after,
        issued_at,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::file_ca::{FileCa, RootCaPem};
    use crate::source::{BoxFuture, IssuedCertificate, TrustBundle};
    use crate::spiffe::TrustDomain;

    fn test_ca() -> FileCa {
        let td = TrustDomain::new("cluster.local").unwrap();
        let root = RootCaPem::generate_valid_for(&td, Duration::from_secs(30 * 86_400)).unwrap();
        FileCa::from_pem(
            td,
            root.cert_pem.as_bytes(),
            "ca.crt".as_ref(),
            root.key_pem.as_bytes(),
            "ca.key".as_ref(),
        )
        .unwrap()
    }

    /// A FileCa whose `sign` fails while `failing` is above zero, counting calls.
    struct Flaky {
        ca: FileCa,
        failing: AtomicUsize,
        calls: AtomicUsize,
    }

    impl CertificateSource for Flaky {
        fn sign<'a>(
            &'a self,
            request: &'a CertificateRequest,
        ) -> BoxFuture<'a, Result<IssuedCertificate, SourceError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let fail = self
                    .failing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    return Err(SourceError::Refused {
                        id: request.id().clone(),
                        reason: "signer down".into(),
                    });
                }
                self.ca.issue(request)
            })
        }

        fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, SourceError>> {
            Box::pin(async move { Ok(self.ca.bundle()) })
        }
    }

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}")
            .parse()
            .unwrap()
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = IdentitiesConfig {
            rotate_at: 1.0,
            ..IdentitiesConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "identities config: rotate_at must be strictly between 0 and 1, got 1"
        );
        let bad = IdentitiesConfig {
            lifetime: Duration::ZERO,
            ..IdentitiesConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "identities config: lifetime must be more than zero"
        );
        assert!(IdentitiesConfig::default().validate().is_ok());
        assert_eq!(
            IdentitiesConfig::default().lifetime,
            Duration::from_secs(86_400)
        );
    }

    /// The schedule, on Tokio's paused clock: renewal at half of 24 h; a failing signer keeps the
    /// old certificate and is retried after 1 s, 2 s, 4 s; the fourth attempt replaces it.
    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_retries_with_backoff() {
        let source = Arc::new(Flaky {
            ca: test_ca(),
            failing: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        });
        let ids = Identities::new(source.clone(), IdentitiesConfig::default()).unwrap();
        let web = id("web");
        ids.add(web.clone()).await.unwrap();
        let first = ids.current(&web).unwrap();
        let lifetime = first
            .not_after()
            .duration_since(first.not_before())
            .unwrap();
        // 24 h from now plus the 5 min backdating, to the second.
        assert!(
            lifetime.as_secs().abs_diff(86_400 + 300) <= 1,
            "{lifetime:?}"
        );
        assert_eq!(ids.expiries(), vec![(web.clone(), first.not_after())]);

        // Renewal is due at half of (notAfter - issuance), notAfter being truncated to the
        // second: between 43,199.5 s and 43,200 s. The checkpoints below sit between the
        // attempts whatever the fraction: R, R + 1 s, R + 3 s, R + 7 s.
        source.failing.store(3, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let at = |secs: f64| tokio::time::sleep_until(start + Duration::from_secs_f64(secs));
        at(43_199.0).await;
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            1,
            "nothing before half-life"
        );
        at(43_200.25).await;
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            2,
            "renewal at half-life"
        );
        assert_eq!(
            ids.current(&web).unwrap().serial(),
            first.serial(),
            "failed: kept"
        );
        at(43_202.0).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 3, "retry after 1 s");
        at(43_205.0).await;
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            4,
            "retry after 2 s more"
        );
        assert_eq!(ids.current(&web).unwrap().serial(), first.serial());
        at(43_208.0).await;
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            5,
            "retry after 4 s more"
        );
        let second = ids.current(&web).unwrap();
        assert_ne!(second.serial(), first.serial());
        assert!(second.not_after() >= first.not_after());

        // Removing the identity stops its renewals.
        assert!(ids.remove(&web));
        assert!(ids.current(&web).is_none());
        tokio::time::sleep(Duration::from_secs(48 * 3600)).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 5);
        assert!(ids.expiries().is_empty());
    }

    #[tokio::test]
    async fn a_failed_first_issue_adds_nothing() {
        let source = Arc::new(Flaky {
            ca: test_ca(),
            failing: AtomicUsize::new(1),
            calls: AtomicUsize::new(0),
        });
        let ids = Identities::new(source, IdentitiesConfig::default()).unwrap();
        let err = ids.add(id("web")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the signer refused the certificate for spiffe://cluster.local/ns/shop/sa/web: signer down"
        );
        assert!(ids.current(&id("web")).is_none());
        ids.add(id("web")).await.unwrap();
        assert!(ids.current(&id("web")).is_some());
    }

    #[tokio::test]
    async fn refuses_an_identity_of_another_trust_domain() {
        let ids = Identities::new(Arc::new(test_ca()), IdentitiesConfig::default()).unwrap();
        let other: SpiffeId = "spiffe://example.org/ns/shop/sa/web".parse().unwrap();
        let err = ids.add(other).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot issue a certificate for spiffe://example.org/ns/shop/sa/web: this CA is for trust domain cluster.local"
        );
    }
}
