//! Upstream connections that are not a plain TCP connect: the agent's mTLS tunnel. A
//! [`Dialer`] set on the [`crate::Proxy`] is asked, for each attempt, whether the connection
//! from the downstream client to the picked endpoint goes another way ([`Route`]); the pools
//! keep such connections apart by the route's key, so a stream opened as one workload identity
//! never carries a request of a client of another.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to an endpoint, as a [`Dial`] returns it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// What [`Dial::dial`] returns.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send + 'static>>;

/// Opens connections along one [`Route`].
pub trait Dial: Send + Sync + 'static {
    /// A new connection to `endpoint`. An error of kind
    /// [`io::ErrorKind::PermissionDenied`] is a refusal by the destination's policy: the
    /// request is answered 403 and the endpoint is not held at fault (no ejection, no retry).
    fn dial(&self, endpoint: SocketAddr) -> Dialing;
}

/// Decides, per upstream attempt, how the proxy reaches an endpoint.
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// The route for a connection from the downstream client `src` (the source workload) to
    /// `endpoint`; `None`: a plain TCP connection.
    fn route(&self, src: SocketAddr, endpoint: SocketAddr) -> Option<Route>;
}

/// A way to an endpoint other than plain TCP. Connections opened along it are pooled under
/// `(endpoint, key)`: two routes with the same key must be interchangeable (same source
/// identity, same destination), two that are not must differ in key.
#[derive(Clone)]
pub struct Route {
    key: Arc<str>,
    dial: Arc<dyn Dial>,
}

impl Route {
    /// A route named `key` whose connections `dial` opens.
    pub fn new(key: impl Into<Arc<str>>, dial: Arc<dyn Dial>) -> Self {
        Self {
            key: key.into(),
            dial,
        }
    }

    /// What tells this route's pooled connections apart from other routes'.
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub(crate) fn dial(&self, endpoint: SocketAddr) -> Dialing {
        self.dial.dial(endpoint)
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route").field("key", &self.key).finish()
    }
}
