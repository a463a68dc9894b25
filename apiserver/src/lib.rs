//! An in-memory Kubernetes API server for tests: the parts of the real API that kubectl and
//! kube-rs clients depend on (discovery, CRUD, patch and apply, watch with bookmarks and 410
//! expiry, CRDs with schema validation), without etcd, authentication or controllers.
//! See the crate README for how it differs from the real server.
#![forbid(unsafe_code)]

pub mod api;
pub mod apply;
pub mod error;
pub mod meta;
pub mod openapi;
pub mod output;
pub mod patch;
pub mod proto;
pub mod resources;
pub mod scale;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod util;
pub mod watch;
