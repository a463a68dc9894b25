//! Hostname index shared by HTTP, gRPC and TLS lookups.
//!
//! Route hostnames fall in three tiers, most specific first: exact names, wildcard names (`*.`
//! plus a suffix, the longer suffix the more specific), and routes without hostnames (any host).
//! For a given host the matching tiers are found with one hash lookup for the exact name and
//! one per label for wildcard suffixes, so the cost does not depend on how many routes exist.
//! `*.example.com` matches `a.example.com` and `a.b.example.com` but not `example.com`.

use std::collections::HashMap;

/// Which tier a value sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum HostKey<'a> {
    /// An exact hostname.
    Exact(&'a str),
    /// `*.` + this suffix.
    Wildcard(&'a str),
    /// Routes without hostnames.
    Any,
}

impl HostKey<'_> {
    /// Parses a route hostname (already validated) into its tier.
    pub(crate) fn of(hostname: Option<&str>) -> HostKey<'_> {
        match hostname {
            None => HostKey::Any,
            Some(h) => match h.strip_prefix("*.") {
                Some(suffix) => HostKey::Wildcard(suffix),
                None => HostKey::Exact(h),
            },
        }
    }

    /// The hostname as written in a route (`*` for the any tier).
    pub(crate) fn display(&self) -> String {
        match self {
            HostKey::Exact(h) => (*h).to_owned(),
            HostKey::Wildcard(s) => format!("*.{s}"),
            HostKey::Any => "*".to_owned(),
        }
    }
}

/// Values per hostname tier; see the module docs.
#[derive(Debug)]
pub(crate) struct HostIndex<T> {
    exact: HashMap<Box<str>, T>,
    wildcard: HashMap<Box<str>, T>,
    any: Option<T>,
}

impl<T> Default for HostIndex<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        }
    }
}

impl<T> HostIndex<T> {
    /// The value for a tier, created with `T::default()` if missing.
    pub(crate) fn entry(&mut self, key: HostKey<'_>) -> &mut T
    where
        T: Default,
    {
        match key {
            HostKey::Exact(h) => self.exact.entry(h.into()).or_default(),
            HostKey::Wildcard(s) => self.wildcard.entry(s.into()).or_default(),
            HostKey::Any => self.any.get_or_insert_with(T::default),
        }
    }

    /// Every tier that matches `host` (already normalized: lower case, no port), most specific
    /// first: the exact name, then wildcard suffixes from longest to shortest, then the any
    /// tier.
    pub(crate) fn matching<'a, 'h>(&'a self, host: &'h str) -> Matching<'a, 'h, T> {
        Matching {
            index: self,
            host,
            stage: Stage::Exact,
        }
    }

    /// All tiers, in no particular order, for dumps and summaries.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (HostKey<'_>, &T)> {
        self.exact
            .iter()
            .map(|(k, v)| (HostKey::Exact(k), v))
            .chain(self.wildcard.iter().map(|(k, v)| (HostKey::Wildcard(k), v)))
            .chain(self.any.iter().map(|v| (HostKey::Any, v)))
    }

    /// Applies `f` to every value.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        self.exact.values_mut().for_each(&mut f);
        self.wildcard.values_mut().for_each(&mut f);
        self.any.iter_mut().for_each(f);
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Exact,
    /// Next wildcard suffix starts after the first `.` at or after this offset.
    Wildcard(usize),
    Any,
    Done,
}

/// Iterator returned by [`HostIndex::matching`].
pub(crate) struct Matching<'a, 'h, T> {
    index: &'a HostIndex<T>,
    host: &'h str,
    stage: Stage,
}

impl<'a, 'h, T> Iterator for Matching<'a, 'h, T> {
    type Item = (HostKey<'h>, &'a T);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.stage {
                Stage::Exact => {
                    self.stage = if self.index.wildcard.is_empty() {
                        Stage::Any
                    } else {
                        Stage::Wildcard(0)
                    };
                    if let Some(v) = self.index.exact.get(self.host) {
                        return Some((HostKey::Exact(self.host), v));
                    }
                }
                Stage::Wildcard(from) => match self.host[from..].find('.') {
                    Some(dot) => {
                        let start = from + dot + 1;
                        self.stage = Stage::Wildcard(start);
                        let suffix = &self.host[start..];
                        if let Some(v) = self.index.wildcard.get(suffix) {
                            return Some((HostKey::Wildcard(suffix), v));
                        }
                    }
                    None => self.stage = Stage::Any,
                },
                Stage::Any => {
                    self.stage = Stage::Done;
                    if let Some(v) = &self.index.any {
                        return Some((HostKey::Any, v));
                    }
                }
                Stage::Done => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(names: &[&str]) -> HostIndex<Vec<String>> {
        let mut index: HostIndex<Vec<String>> = HostIndex::default();
        for name in names {
            let key = if *name == "*" {
                HostKey::Any
            } else {
                HostKey::of(Some(name))
            };
            index.entry(key).push((*name).to_owned());
        }
        index
    }

    fn tiers(index: &HostIndex<Vec<String>>, host: &str) -> Vec<String> {
        index
            .matching(host)
            .flat_map(|(_, v)| v.iter().cloned())
            .collect()
    }

    #[test]
    fn exact_then_longest_wildcard_then_any() {
        let index = index(&["*", "*.com", "*.bar.com", "foo.bar.com", "*.foo.bar.com"]);
        assert_eq!(
            tiers(&index, "foo.bar.com"),
            ["foo.bar.com", "*.bar.com", "*.com", "*"]
        );
        assert_eq!(
            tiers(&index, "x.foo.bar.com"),
            ["*.foo.bar.com", "*.bar.com", "*.com", "*"]
        );
        assert_eq!(tiers(&index, "bar.com"), ["*.com", "*"]);
        assert_eq!(tiers(&index, "com"), ["*"]);
        assert_eq!(tiers(&index, ""), ["*"]);
    }

    #[test]
    fn wildcard_does_not_match_its_own_suffix() {
        let index = index(&["*.example.com"]);
        assert!(tiers(&index, "example.com").is_empty());
        assert_eq!(tiers(&index, "a.example.com"), ["*.example.com"]);
        assert_eq!(tiers(&index, "a.b.example.com"), ["*.example.com"]);
        assert!(tiers(&index, "a.example.net").is_empty());
    }
}
