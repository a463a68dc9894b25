//! The live policy: one [`Compiled`] behind an atomic pointer swap, so readers never lock and a
//! reload never blocks a lookup.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::compiled::Compiled;

/// Holds the current [`Compiled`] policy. Readers take a snapshot with [`PolicyStore::current`]
/// and keep using it for the whole connection or request, even if a reload happens meanwhile.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Compiled>,
}

impl PolicyStore {
    /// A store holding `policy`.
    pub fn new(policy: Compiled) -> Self {
        Self {
            current: ArcSwap::from_pointee(policy),
        }
    }

    /// The current policy.
    pub fn current(&self) -> Arc<Compiled> {
        self.current.load_full()
    }

    /// Installs a new policy and returns the previous one.
    pub fn replace(&self, policy: Compiled) -> Arc<Compiled> {
        self.current.swap(Arc::new(policy))
    }
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new(Compiled::empty())
    }
}
