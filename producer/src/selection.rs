//! Which crates and versions a run takes, whatever the source: the name patterns, the versions
//! of each crate (newest only, or all; yanked and pre-release ones on request), a seeded random
//! sample, and the reverse dependencies of a crate.
//!
//! The source (registry listing, list, database dump) says which crates exist; a [`Filter`]
//! narrows them. Everything here is deterministic: the same registry state and filter give the
//! same selection, which is what lets an interrupted run be resumed by recomputing it.

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Narrows what a source offers. Stored with the run's definition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Every version ever published instead of each crate's newest.
    pub all_versions: bool,
    /// Include yanked versions.
    pub yanked: bool,
    /// Include pre-release versions (`1.0.0-rc.1`).
    pub prereleases: bool,
    /// Only crates whose name matches one of these globs (`serde*`, `tokio-?`); none: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// Only the crates that depend on this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dependents: Option<Dependents>,
    /// A seeded random sample of the crates left after the other filters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<Sample>,
}

impl Filter {
    pub fn is_default(&self) -> bool {
        self == &Filter::default()
    }

    /// Refuses a filter that cannot select anything sensible, naming what is wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        NamePatterns::new(&self.patterns)?;
        if let Some(sample) = self.sample {
            anyhow::ensure!(sample.size > 0, "a sample needs at least one crate");
        }
        if let Some(dependents) = &self.dependents {
            anyhow::ensure!(
                dependents.depth > 0,
                "the depth of reverse dependencies is at least 1 (direct dependents)"
            );
            crate::check_package_spec(&dependents.name)
                .context("the crate whose dependents to take")?;
            anyhow::ensure!(
                !dependents.name.contains('@'),
                "the crate whose dependents to take is a name, without a version"
            );
        }
        Ok(())
    }

    /// Whether the crate list must be known in full before anything is published: a sample and
    /// reverse dependencies are properties of the whole registry, not of one page.
    pub fn needs_whole_registry(&self) -> bool {
        self.dependents.is_some() || self.sample.is_some()
    }

    /// Whether a version with these properties may be taken.
    pub fn allows(&self, yanked: bool, prerelease: bool) -> bool {
        (self.yanked || !yanked) && (self.prereleases || !prerelease)
    }

    /// The versions to take of one crate, from its `(version, yanked)` list: all that are
    /// allowed, or the newest of them. Versions that are not semver are never taken.
    pub fn choose<'a, T>(
        &self,
        versions: impl IntoIterator<Item = (&'a str, bool, T)>,
    ) -> Vec<(semver::Version, T)> {
        let mut allowed: Vec<(semver::Version, T)> = versions
            .into_iter()
            .filter_map(|(num, yanked, item)| {
                let version = semver::Version::parse(num).ok()?;
                self.allows(yanked, !version.pre.is_empty())
                    .then_some((version, item))
            })
            .collect();
        allowed.sort_by(|(a, _), (b, _)| a.cmp(b));
        if !self.all_versions {
            allowed.drain(..allowed.len().saturating_sub(1));
        }
        allowed
    }
}

/// The crates that depend on `name`, directly (`depth` 1) or through up to `depth` links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependents {
    pub name: String,
    #[serde(default = "one")]
    pub depth: u32,
}

fn one() -> u32 {
    1
}

/// `size` crates chosen at random, the same ones for the same `seed` and registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub size: u64,
    #[serde(default)]
    pub seed: u64,
}

/// Crate-name globs, compiled once; matching ignores case, as crates.io's names do.
#[derive(Debug, Clone)]
pub struct NamePatterns(Option<globset::GlobSet>);

impl NamePatterns {
    pub fn new(patterns: &[String]) -> anyhow::Result<NamePatterns> {
        if patterns.is_empty() {
            return Ok(NamePatterns(None));
        }
        let mut set = globset::GlobSetBuilder::new();
        for pattern in patterns {
            set.add(
                globset::GlobBuilder::new(pattern)
                    .case_insensitive(true)
                    .build()
                    .with_context(|| format!("invalid name pattern {pattern:?}"))?,
            );
        }
        Ok(NamePatterns(Some(set.build()?)))
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|set| set.is_match(name))
    }
}

/// The `size` items whose keyed hash is smallest: a uniform sample that does not depend on the
/// order the items come in, kept in O(size) memory.
pub fn sample<T: Ord, K: AsRef<str>>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    sample: Sample,
) -> Vec<T> {
    let size = usize::try_from(sample.size).unwrap_or(usize::MAX);
    let mut heap: BinaryHeap<([u8; 16], T)> = BinaryHeap::new();
    for item in items {
        let mut hasher = Sha256::new();
        hasher.update(sample.seed.to_le_bytes());
        // Names ignore case (as crates.io's do): every source samples the same crates.
        hasher.update(key(&item).as_ref().to_ascii_lowercase().as_bytes());
        let digest = hasher.finalize();
        let mut rank = [0u8; 16];
        rank.copy_from_slice(&digest[..16]);
        if heap.len() < size {
            heap.push((rank, item));
        } else if heap.peek().is_some_and(|(top, _)| rank < *top) {
            heap.pop();
            heap.push((rank, item));
        }
    }
    heap.into_iter().map(|(_, item)| item).collect()
}

/// A dependency graph over crate keys (names, or a dump's crate ids), kept reversed: for each
/// crate, the crates that depend on it.
#[derive(Debug, Default)]
pub struct ReverseDependencies<K> {
    dependents: HashMap<K, BTreeSet<K>>,
}

impl<K: std::hash::Hash + Eq + Ord + Clone> ReverseDependencies<K> {
    pub fn add(&mut self, dependent: K, dependency: K) {
        if dependent != dependency {
            self.dependents
                .entry(dependency)
                .or_default()
                .insert(dependent);
        }
    }

    /// Every crate that reaches `root` in at most `depth` links (without `root` itself).
    pub fn of(&self, root: &K, depth: u32) -> HashSet<K> {
        let mut found = HashSet::new();
        let mut frontier = vec![root.clone()];
        for _ in 0..depth {
            let mut next = Vec::new();
            for key in &frontier {
                for dependent in self.dependents.get(key).into_iter().flatten() {
                    if dependent != root && found.insert(dependent.clone()) {
                        next.push(dependent.clone());
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions() -> Vec<(&'static str, bool, ())> {
        vec![
            ("1.0.0", false, ()),
            ("1.2.0", true, ()),
            ("1.10.0", false, ()),
            ("2.0.0-rc.1", false, ()),
            ("not-semver", false, ()),
        ]
    }

    fn chosen(filter: &Filter) -> Vec<String> {
        filter
            .choose(versions())
            .into_iter()
            .map(|(v, ())| v.to_string())
            .collect()
    }

    #[test]
    fn versions_are_chosen_as_asked() {
        assert_eq!(chosen(&Filter::default()), ["1.10.0"]);
        let all = Filter {
            all_versions: true,
            ..Filter::default()
        };
        assert_eq!(chosen(&all), ["1.0.0", "1.10.0"]);
        let everything = Filter {
            all_versions: true,
            yanked: true,
            prereleases: true,
            ..Filter::default()
        };
        assert_eq!(
            chosen(&everything),
            ["1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1"]
        );
        let newest_pre = Filter {
            prereleases: true,
            ..Filter::default()
        };
        assert_eq!(chosen(&newest_pre), ["2.0.0-rc.1"]);
        assert!(Filter::default().choose([("1.0.0", true, ())]).is_empty());
    }

    #[test]
    fn patterns_match_names_ignoring_case() {
        let patterns = NamePatterns::new(&["serde*".into(), "tokio-?".into()]).unwrap();
        assert!(patterns.matches("serde_json"));
        assert!(patterns.matches("Serde"));
        assert!(patterns.matches("tokio-1"));
        assert!(!patterns.matches("tokio-util"));
        assert!(NamePatterns::new(&[]).unwrap().matches("anything"));
        assert!(NamePatterns::new(&["[".into()]).is_err());
    }

    #[test]
    fn a_sample_depends_on_the_seed_not_the_order() {
        let names: Vec<String> = (0..1000).map(|i| format!("crate-{i}")).collect();
        let pick = |names: Vec<String>, seed| {
            let mut chosen = sample(names, |n| n.clone(), Sample { size: 50, seed });
            chosen.sort();
            chosen
        };
        let a = pick(names.clone(), 7);
        assert_eq!(a.len(), 50);
        let mut reversed = names.clone();
        reversed.reverse();
        assert_eq!(pick(reversed, 7), a, "same seed, other order");
        assert_ne!(pick(names.clone(), 8), a, "another seed");
        assert_eq!(pick(names[..10].to_vec(), 7).len(), 10, "fewer than asked");
    }

    #[test]
    fn dependents_are_found_to_the_chosen_depth() {
        let mut graph = ReverseDependencies::default();
        graph.add("b", "a");
        graph.add("c", "b");
        graph.add("d", "c");
        graph.add("a", "d"); // a cycle back to the root
        graph.add("e", "a");
        let names = |depth| {
            let mut found: Vec<_> = graph.of(&"a", depth).into_iter().collect();
            found.sort();
            found
        };
        assert_eq!(names(1), ["b", "e"]);
        assert_eq!(names(2), ["b", "c", "e"]);
        assert_eq!(names(10), ["b", "c", "d", "e"]);
    }
}
