//! The size of a package's dependency tree, read from the index: how a run orders the jobs no
//! earlier run has timed. Jobs with an earlier duration go longest first (`Store::record_jobs`);
//! a first run has none, and without an estimate its slowest crate could start last and be the
//! run's whole last minutes. Compile time grows with the packages a build pulls in, so the jobs
//! without history go largest tree first.
//!
//! It is an estimate, not a resolution: each dependency counts by name, with the edges of its
//! newest usable version (normal and build dependencies, optional ones only where its default
//! features enable them, none for other platforms). An index file that cannot be read counts as
//! a leaf. Each name's index file is read once per producer invocation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt as _;
use quarry_core::index::{IndexDependency, IndexEntry};
use quarry_infra::registry::RegistryClient;

use crate::resolution::INDEX_CONCURRENCY;

/// The edges learned so far, by lowercase crate name.
#[derive(Default)]
pub(crate) struct Trees {
    edges: Mutex<HashMap<String, Vec<String>>>,
}

impl Trees {
    /// `items` (each with the name of its package) reordered largest dependency tree first,
    /// counting each package's newest version's tree: an estimate either way. Items of equal
    /// trees keep their order.
    pub(crate) async fn largest_first<T>(
        &self,
        registry: &RegistryClient,
        items: Vec<(String, T)>,
    ) -> Vec<T> {
        let roots: Vec<[String; 1]> = items
            .iter()
            .map(|(name, _)| [name.to_ascii_lowercase()])
            .collect();
        let roots: Vec<&[String]> = roots.iter().map(|r| &r[..]).collect();
        let sizes = self.sizes(registry, &roots).await;
        let mut sized: Vec<(usize, T)> = sizes
            .into_iter()
            .zip(items.into_iter().map(|(_, item)| item))
            .collect();
        sized.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        sized.into_iter().map(|(_, item)| item).collect()
    }

    /// How many distinct packages each of the trees of `roots` holds (a tree's roots by
    /// lowercase name: usually one package, counted with what it pulls in).
    async fn sizes(&self, registry: &RegistryClient, roots: &[&[String]]) -> Vec<usize> {
        // Learn every name any of the trees reaches, a level at a time, reading the index files
        // of a level at once.
        let mut wanted: Vec<String> = roots.iter().flat_map(|r| r.iter().cloned()).collect();
        loop {
            wanted.sort();
            wanted.dedup();
            let unknown: Vec<String> = {
                let edges = self.edges.lock().expect("no panic holds the lock");
                wanted
                    .drain(..)
                    .filter(|name| !edges.contains_key(name))
                    .collect()
            };
            if unknown.is_empty() {
                break;
            }
            let learned: Vec<(String, Vec<String>)> = futures::stream::iter(unknown)
                .map(|name| async move {
                    let edges = match registry.index_entries(&name).await {
                        Ok(entries) => newest_edges(&entries),
                        Err(err) => {
                            tracing::debug!(%name, %err, "no index file for the tree estimate");
                            Vec::new()
                        }
                    };
                    (name, edges)
                })
                .buffer_unordered(INDEX_CONCURRENCY)
                .collect()
                .await;
            let mut edges = self.edges.lock().expect("no panic holds the lock");
            for (name, to) in learned {
                wanted.extend(to.iter().cloned());
                edges.insert(name, to);
            }
        }
        let edges = self.edges.lock().expect("no panic holds the lock");
        roots
            .iter()
            .map(|direct| {
                let mut seen: HashSet<&str> = HashSet::new();
                let mut stack: Vec<&str> = direct.iter().map(String::as_str).collect();
                while let Some(name) = stack.pop() {
                    if seen.insert(name) {
                        stack.extend(edges.get(name).into_iter().flatten().map(String::as_str));
                    }
                }
                seen.len()
            })
            .collect()
    }
}

/// The edges of a package's newest version that is neither yanked nor a pre-release (else its
/// newest at all), by lowercase name.
fn newest_edges(entries: &[IndexEntry]) -> Vec<String> {
    let parsed = |e: &IndexEntry| semver::Version::parse(&e.vers).ok();
    let newest = entries
        .iter()
        .filter(|e| !e.yanked)
        .filter_map(|e| parsed(e).filter(|v| v.pre.is_empty()).map(|v| (v, e)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, e)| e)
        .or_else(|| entries.last());
    newest.map(build_edges).unwrap_or_default()
}

/// What building `entry` with its default features compiles: its normal and build dependencies
/// on the same registry, the optional ones only where a default feature enables them, none
/// meant only for another platform than Linux.
fn build_edges(entry: &IndexEntry) -> Vec<String> {
    let enabled = default_enabled(entry);
    let mut names: Vec<String> = entry
        .deps
        .iter()
        .filter(|d| d.registry.is_none() && d.kind.as_deref() != Some("dev"))
        .filter(|d| !d.optional || enabled.contains(d.name.as_str()))
        .filter(|d| for_linux(d))
        .map(|d| d.crate_name().to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The names (features and optional dependencies) the `default` feature turns on, through the
/// features it names.
fn default_enabled(entry: &IndexEntry) -> HashSet<&str> {
    let mut features: BTreeMap<&str, &[String]> = entry
        .features
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    for (k, v) in entry.features2.iter().flatten() {
        features.insert(k, v);
    }
    let mut enabled = HashSet::new();
    let mut stack = vec!["default"];
    while let Some(feature) = stack.pop() {
        if !enabled.insert(feature) {
            continue;
        }
        for value in features.get(feature).copied().unwrap_or_default() {
            // "dep:x", "x", "x/feature" and "x?/feature" (the last enables nothing by itself).
            if value.contains("?/") {
                continue;
            }
            let name = value.strip_prefix("dep:").unwrap_or(value);
            stack.push(name.split('/').next().unwrap_or(name));
        }
    }
    enabled
}

/// Whether a dependency is built on Linux, roughly: a `cfg` that names another platform only is
/// not. An estimate needs no cfg evaluator.
fn for_linux(dependency: &IndexDependency) -> bool {
    let Some(target) = &dependency.target else {
        return true;
    };
    let target = target.to_ascii_lowercase();
    if target.contains("not(") || target.contains("unix") || target.contains("linux") {
        return true;
    }
    ![
        "windows",
        "macos",
        "ios",
        "android",
        "wasm",
        "apple",
        "redox",
        "hermit",
        "fuchsia",
        "wasi",
        "emscripten",
        "freebsd",
        "solaris",
        "illumos",
        "haiku",
        "vxworks",
    ]
    .iter()
    .any(|other| target.contains(other))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(deps: serde_json::Value, features: serde_json::Value) -> IndexEntry {
        serde_json::from_value(serde_json::json!({
            "name": "root", "vers": "1.0.0", "cksum": "00", "deps": deps, "features": features,
        }))
        .unwrap()
    }

    #[test]
    fn a_tree_counts_what_a_default_linux_build_compiles() {
        let root = entry(
            serde_json::json!([
                {"name": "serde", "req": "1", "kind": "normal"},
                {"name": "cc", "req": "1", "kind": "build"},
                {"name": "proptest", "req": "1", "kind": "dev"},
                {"name": "winapi", "req": "0.3", "target": "cfg(windows)"},
                {"name": "libc", "req": "0.2", "target": "cfg(unix)"},
                {"name": "nix", "req": "0.2", "target": "cfg(not(windows))"},
                {"name": "on", "req": "1", "optional": true},
                {"name": "through", "req": "1", "optional": true},
                {"name": "off", "req": "1", "optional": true},
                {"name": "weak", "req": "1", "optional": true},
                {"name": "renamed", "req": "1", "package": "Real-Name"},
            ]),
            serde_json::json!({
                "default": ["dep:on", "std", "weak?/x"],
                "std": ["through/std"],
                "extra": ["off"],
            }),
        );
        assert_eq!(
            build_edges(&root),
            ["cc", "libc", "nix", "on", "real-name", "serde", "through"]
        );
    }
}
