//! Reads `.crate` files into index entries: name, version, checksum, dependencies and features,
//! taken from the `Cargo.toml` that `cargo publish` normalized into each archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use quarry_core::index::{IndexDependency, IndexEntry};

/// One version of a crate that the registry can serve.
#[derive(Debug, Clone)]
pub struct Published {
    pub entry: IndexEntry,
    pub path: PathBuf,
    pub size: u64,
}

/// Every crate version found, by lower-case crate name, versions in semver order.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub crates: BTreeMap<String, Vec<Published>>,
    /// Files that could not be read, with the reason; they are left out, not fatal.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Corpus {
    /// Loads every `*.crate` file under `dirs` (searched up to three levels deep).
    pub fn load(dirs: &[PathBuf]) -> anyhow::Result<Corpus> {
        let mut files = Vec::new();
        for dir in dirs {
            find_crate_files(dir, 3, &mut files)
                .with_context(|| format!("cannot list {}", dir.display()))?;
        }
        files.sort();
        let mut corpus = Corpus::default();
        for file in files {
            match read_crate_file(&file) {
                Ok(published) => corpus.add(published),
                Err(err) => corpus.skipped.push((file, format!("{err:#}"))),
            }
        }
        Ok(corpus)
    }

    /// Marks `name@version` yanked, as crates.io does when its owner yanks it: served, but not
    /// chosen by a resolver that has no lockfile naming it.
    pub fn yank(&mut self, name: &str, version: &str) -> anyhow::Result<()> {
        let published = self
            .crates
            .get_mut(&name.to_ascii_lowercase())
            .and_then(|versions| versions.iter_mut().find(|p| p.entry.vers == version))
            .with_context(|| format!("the corpus has no {name}@{version} to yank"))?;
        published.entry.yanked = true;
        Ok(())
    }

    fn add(&mut self, published: Published) {
        let versions = self
            .crates
            .entry(published.entry.name.to_ascii_lowercase())
            .or_default();
        if versions
            .iter()
            .any(|p| p.entry.vers == published.entry.vers)
        {
            return; // The same version from two cache directories.
        }
        versions.push(published);
        versions.sort_by(|a, b| semver_order(&a.entry.vers, &b.entry.vers));
    }

    /// Keeps only versions whose every dependency (normal, build, dev and optional, for every
    /// target, as cargo needs them to write a lockfile) can be met inside the corpus, repeating
    /// until nothing more drops out. A package cache holds only what one build needed, so without
    /// this most of its crates could not even be resolved; with it, the registry behaves like a
    /// complete one for the crates it lists.
    pub fn closed(mut self) -> Corpus {
        loop {
            let unmet: Vec<(String, String)> = self
                .crates
                .iter()
                .flat_map(|(key, versions)| versions.iter().map(move |p| (key, p)))
                .filter(|(_, p)| p.entry.deps.iter().any(|dep| !self.satisfies(dep)))
                .map(|(key, p)| (key.clone(), p.entry.vers.clone()))
                .collect();
            if unmet.is_empty() {
                return self;
            }
            for (key, vers) in unmet {
                if let Some(versions) = self.crates.get_mut(&key) {
                    versions.retain(|p| p.entry.vers != vers);
                    if versions.is_empty() {
                        self.crates.remove(&key);
                    }
                }
            }
        }
    }

    fn satisfies(&self, dep: &IndexDependency) -> bool {
        let name = dep.crate_name();
        let Ok(req) = semver::VersionReq::parse(&dep.req) else {
            return false;
        };
        self.get(name).is_some_and(|versions| {
            versions
                .iter()
                .any(|p| semver::Version::parse(&p.entry.vers).is_ok_and(|v| req.matches(&v)))
        })
    }

    pub fn versions(&self) -> usize {
        self.crates.values().map(Vec::len).sum()
    }

    pub fn get(&self, name: &str) -> Option<&[Published]> {
        self.crates
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
    }

    /// How many crates of the corpus depend on each crate: a stand-in for download counts, so
    /// "most downloaded" orders crates the way popularity does.
    pub fn dependents(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for versions in self.crates.values() {
            let Some(latest) = versions.last() else {
                continue;
            };
            for dep in &latest.entry.deps {
                let name = dep.crate_name();
                *counts.entry(name.to_ascii_lowercase()).or_insert(0) += 1;
            }
        }
        counts
    }
}

fn semver_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

fn find_crate_files(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() && depth > 0 {
            find_crate_files(&path, depth - 1, out)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "crate") {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads one `.crate` file into its index entry.
pub fn read_crate_file(path: &Path) -> anyhow::Result<Published> {
    let bytes = std::fs::read(path)?;
    let entry = quarry_core::archive::index_entry(&bytes)?;
    Ok(Published {
        entry,
        path: path.to_owned(),
        size: bytes.len() as u64,
    })
}

/// The `Cargo.lock` a `.crate` file ships at its top, if it ships one, as text (data: nothing
/// of it is obeyed).
pub fn shipped_lockfile(path: &Path) -> anyhow::Result<Option<String>> {
    quarry_core::archive::top_level_file(&std::fs::read(path)?, "Cargo.lock")
}
