//! What the examples share: a CA made in memory and the two identities they use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_identity::{
    FileCa, Identities, IdentitiesConfig, RootCaPem, SpiffeId, TrustBundle, TrustDomain,
};

pub const CLIENT: &str = "spiffe://cluster.local/ns/bench/sa/client";
pub const SERVER: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// Identities holding certificates for [`CLIENT`] and [`SERVER`] from a new CA, its bundle,
/// and the two IDs.
pub async fn identities() -> (Identities, TrustBundle, SpiffeId, SpiffeId) {
    let domain = TrustDomain::new("cluster.local").unwrap();
    let root = RootCaPem::generate_valid_for(&domain, Duration::from_secs(3600)).unwrap();
    let ca = FileCa::from_pem(
        domain,
        root.cert_pem.as_bytes(),
        Path::new("memory/ca.crt"),
        root.key_pem.as_bytes(),
        Path::new("memory/ca.key"),
    )
    .unwrap();
    let bundle = ca.bundle();
    let ids = Identities::new(Arc::new(ca), IdentitiesConfig::default()).unwrap();
    let (client_id, server_id): (SpiffeId, SpiffeId) =
        (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
    ids.add(client_id.clone()).await.unwrap();
    ids.add(server_id.clone()).await.unwrap();
    (ids, bundle, client_id, server_id)
}
