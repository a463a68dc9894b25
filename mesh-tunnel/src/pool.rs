//! The client's pool of HTTP/2 connections, per (source identity, destination identity, peer
//! node): a connection authenticates exactly one pair of workloads, so streams share it only
//! within that pair. And per thread: the agent's workers are single-threaded runtimes, and a
//! connection is driven on the worker that dialed it, so streams opened on another worker would
//! wake that one for every frame they send or receive.
//!
//! Each connection counts its streams ([`Slot`]s); a connect takes a slot on a connection below
//! the stream limit or dials a new one (one dial at a time per key, so a burst of connects to a
//! new peer opens one connection, not one each). A task per connection drives it, removes it
//! from the pool when it ends, and closes it after the idle timeout without streams. The pool's
//! lock is only held to pick or insert a connection, never across an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use h2::client::SendRequest;
use mesh_identity::SpiffeId;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a pooled connection authenticates and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) src: SpiffeId,
    pub(crate) dst_id: SpiffeId,
    pub(crate) peer: SocketAddr,
    /// The thread opening streams (see the module's documentation).
    pub(crate) thread: std::thread::ThreadId,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (counters and vectors
/// updated by single statements), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// All pooled connections of a client.
#[derive(Default)]
pub(crate) struct Pool {
    keys: Mutex<HashMap<Key, Arc<KeyPool>>>,
}

impl Pool {
    /// The connections of `key` (created empty on first use).
    pub(crate) fn get(&self, key: &Key) -> Arc<KeyPool> {
        lock(&self.keys).entry(key.clone()).or_default().clone()
    }

    /// Forgets `key` if it has no connection and nobody else holds it (a connect in progress
    /// does), so the map does not keep every pair ever seen.
    pub(crate) fn forget_if_empty(&self, key: &Key, pool: &Arc<KeyPool>) {
        let mut keys = lock(&self.keys);
        // Held by the map and by the caller only: no connect in progress can insert into it.
        if Arc::strong_count(pool) == 2 && lock(&pool.conns).is_empty() {
            keys.remove(key);
        }
    }
}

/// The connections of one key.
#[derive(Default)]
pub(crate) struct KeyPool {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while dialing, so concurrent connects wait for one new connection.
    pub(crate) dialing: tokio::sync::Mutex<()>,
}

impl KeyPool {
    /// A slot on a live connection below its stream limit, if any.
    pub(crate) fn checkout(&self, max_streams: usize) -> Option<Slot> {
        let conns = lock(&self.conns);
        conns.iter().find_map(|conn| conn.try_take(max_streams))
    }

    /// Adds a new connection and takes its first slot.
    pub(crate) fn insert(&self, conn: Arc<Conn>) -> Slot {
        let slot = conn.take();
        lock(&self.conns).push(conn);
        slot
    }

    /// Removes `conn` (dead or idle); later checkouts will not see it.
    pub(crate) fn remove(&self, conn: &ConnShared) {
        lock(&self.conns).retain(|c| c.shared.id != conn.id);
        lock(&conn.state).closed = true;
    }

    /// Removes `conn` if it has carried no stream for `idle_timeout` (checked under the pool's
    /// lock, so no checkout can take a slot in between). Returns whether it was removed.
    pub(crate) fn remove_if_idle(
        &self,
        conn: &ConnShared,
        idle_timeout: std::time::Duration,
    ) -> bool {
        let mut conns = lock(&self.conns);
        let mut state = lock(&conn.state);
        if state.active > 0 || state.idle_since.elapsed() < idle_timeout {
            return false;
        }
        state.closed = true;
        conns.retain(|c| c.shared.id != conn.id);
        true
    }
}

/// One HTTP/2 connection: the handle to open streams, and the state its driver shares.
pub(crate) struct Conn {
    pub(crate) send: SendRequest<Bytes>,
    pub(crate) shared: Arc<ConnShared>,
}

/// A connection's state, shared by its slots and its driver task.
#[derive(Debug)]
pub(crate) struct ConnShared {
    /// Distinguishes connections of one key.
    pub(crate) id: u64,
    /// Serial number of the certificate the server presented.
    pub(crate) server_serial: Arc<str>,
    /// The first TLS error the connection read (see [`crate::handshake::Recorded`]).
    pub(crate) tls_error: Arc<OnceLock<rustls::Error>>,
    state: Mutex<ConnState>,
    /// Signalled when the last stream ends, so the driver restarts its idle timer.
    pub(crate) idle: Notify,
}

#[derive(Debug)]
struct ConnState {
    active: usize,
    idle_since: Instant,
    /// Removed from the pool: no new streams.
    closed: bool,
}

impl ConnShared {
    pub(crate) fn new(
        id: u64,
        server_serial: String,
        tls_error: Arc<OnceLock<rustls::Error>>,
    ) -> Self {
        ConnShared {
            id,
            server_serial: server_serial.into(),
            tls_error,
            state: Mutex::new(ConnState {
                active: 0,
                idle_since: Instant::now(),
                closed: false,
            }),
            idle: Notify::new(),
        }
    }

    /// When the connection became idle, if it carries no stream.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        let state = lock(&self.state);
        (state.active == 0).then_some(state.idle_since)
    }
}

impl Conn {
    fn try_take(self: &Arc<Self>, max_streams: usize) -> Option<Slot> {
        // The server's SETTINGS may allow fewer streams than we would like.
        let limit = max_streams.min(self.send.current_max_send_streams());
        let mut state = lock(&self.shared.state);
        if state.closed || state.active >= limit {
            return None;
        }
        state.active += 1;
        Some(Slot { conn: self.clone() })
    }

    fn take(self: &Arc<Self>) -> Slot {
        lock(&self.shared.state).active += 1;
        Slot { conn: self.clone() }
    }
}

/// One stream's claim on a connection; released on drop.
pub(crate) struct Slot {
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.conn.shared.state);
        state.active = state.active.saturating_sub(1);
        if state.active == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.conn.shared.idle.notify_one();
        }
    }
}
