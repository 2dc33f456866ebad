//! Reads `.crate` files into index entries: name, version, checksum, dependencies and features,
//! taken from the `Cargo.toml` that `cargo publish` normalized into each archive.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use quarry_shared::registry::{IndexDependency, IndexEntry};
use sha2::{Digest as _, Sha256};

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
    let cksum = hex::encode(Sha256::digest(&bytes));
    let manifest = manifest_of(&bytes)?;
    let entry = index_entry(&manifest, cksum)?;
    Ok(Published {
        entry,
        path: path.to_owned(),
        size: bytes.len() as u64,
    })
}

/// The top-level `Cargo.toml` of a `.crate` archive (`<name>-<version>/Cargo.toml`).
fn manifest_of(archive: &[u8]) -> anyhow::Result<toml::Table> {
    let text = top_level_file(archive, "Cargo.toml")?
        .context("no Cargo.toml at the top of the archive")?;
    Ok(toml::from_str(&text)?)
}

/// The `Cargo.lock` a `.crate` file ships at its top, if it ships one, as text (data: nothing
/// of it is obeyed).
pub fn shipped_lockfile(path: &Path) -> anyhow::Result<Option<String>> {
    top_level_file(&std::fs::read(path)?, "Cargo.lock")
}

/// A regular file at the top of a `.crate` archive (`<name>-<version>/<file>`), at most 4 MiB.
fn top_level_file(archive: &[u8], name: &str) -> anyhow::Result<Option<String>> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in tar.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let mut parts = path.components();
        let (Some(_), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if file.as_os_str() == name && entry.header().entry_type().is_file() {
            let mut text = String::new();
            entry.take(4 << 20).read_to_string(&mut text)?;
            return Ok(Some(text));
        }
    }
    Ok(None)
}

fn index_entry(manifest: &toml::Table, cksum: String) -> anyhow::Result<IndexEntry> {
    let package = manifest
        .get("package")
        .or_else(|| manifest.get("project"))
        .and_then(toml::Value::as_table)
        .context("Cargo.toml has no [package]")?;
    let field = |key: &str| package.get(key).and_then(toml::Value::as_str);
    let name = field("name").context("package has no name")?.to_owned();
    let vers = field("version")
        .context("package has no version")?
        .to_owned();

    let mut deps = Vec::new();
    collect_deps(manifest, None, &mut deps);
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for (target, table) in targets {
            if let Some(table) = table.as_table() {
                collect_deps(table, Some(target), &mut deps);
            }
        }
    }

    // Feature values using `dep:` or `?/` go to `features2`, as crates.io does for old cargos.
    let mut features = BTreeMap::new();
    let mut features2 = BTreeMap::new();
    if let Some(table) = manifest.get("features").and_then(toml::Value::as_table) {
        for (feature, values) in table {
            let values: Vec<String> = values
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if values
                .iter()
                .any(|v| v.starts_with("dep:") || v.contains("?/"))
            {
                features2.insert(feature.clone(), values);
            } else {
                features.insert(feature.clone(), values);
            }
        }
    }
    let has_features2 = !features2.is_empty();
    Ok(IndexEntry {
        name,
        vers,
        deps,
        cksum,
        features,
        features2: has_features2.then_some(features2),
        yanked: false,
        links: field("links").map(str::to_owned),
        rust_version: field("rust-version").map(str::to_owned),
        v: has_features2.then_some(2),
    })
}

fn collect_deps(table: &toml::Table, target: Option<&str>, out: &mut Vec<IndexDependency>) {
    const SECTIONS: [(&str, &str); 5] = [
        ("dependencies", "normal"),
        ("dev-dependencies", "dev"),
        ("dev_dependencies", "dev"),
        ("build-dependencies", "build"),
        ("build_dependencies", "build"),
    ];
    for (section, kind) in SECTIONS {
        let Some(deps) = table.get(section).and_then(toml::Value::as_table) else {
            continue;
        };
        for (name, spec) in deps {
            let dep = match spec {
                toml::Value::String(req) => IndexDependency {
                    name: name.clone(),
                    req: req.clone(),
                    features: Vec::new(),
                    optional: false,
                    default_features: true,
                    target: target.map(str::to_owned),
                    kind: Some(kind.to_owned()),
                    registry: None,
                    package: None,
                },
                toml::Value::Table(spec) => {
                    let text = |key: &str| spec.get(key).and_then(toml::Value::as_str);
                    let flag = |key: &str| spec.get(key).and_then(toml::Value::as_bool);
                    IndexDependency {
                        name: name.clone(),
                        req: text("version").unwrap_or("*").to_owned(),
                        features: spec
                            .get("features")
                            .and_then(toml::Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(|v| v.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        optional: flag("optional").unwrap_or(false),
                        default_features: flag("default-features")
                            .or_else(|| flag("default_features"))
                            .unwrap_or(true),
                        target: target.map(str::to_owned),
                        kind: Some(kind.to_owned()),
                        registry: None,
                        package: text("package").map(str::to_owned),
                    }
                }
                _ => continue,
            };
            out.push(dep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_manifests_become_index_entries() {
        let manifest: toml::Table = toml::from_str(
            r#"
            [package]
            name = "demo"
            version = "1.2.3"
            rust-version = "1.70"
            [features]
            default = ["std"]
            std = []
            serde = ["dep:serde"]
            [dependencies.serde]
            version = "1.0"
            optional = true
            default-features = false
            [dependencies]
            itoa = "1"
            [dev-dependencies.renamed]
            version = "0.3"
            package = "real-name"
            [target."cfg(windows)".dependencies.winapi]
            version = "0.3"
            features = ["fileapi"]
            "#,
        )
        .unwrap();
        let entry = index_entry(&manifest, "00".into()).unwrap();
        assert_eq!(
            (entry.name.as_str(), entry.vers.as_str()),
            ("demo", "1.2.3")
        );
        assert_eq!(entry.rust_version.as_deref(), Some("1.70"));
        assert_eq!(entry.v, Some(2));
        assert!(entry.features2.unwrap().contains_key("serde"));
        assert!(entry.features.contains_key("std"));
        let serde = entry.deps.iter().find(|d| d.name == "serde").unwrap();
        assert!(serde.optional && !serde.default_features);
        let renamed = entry.deps.iter().find(|d| d.name == "renamed").unwrap();
        assert_eq!(renamed.package.as_deref(), Some("real-name"));
        assert_eq!(renamed.kind.as_deref(), Some("dev"));
        let winapi = entry.deps.iter().find(|d| d.name == "winapi").unwrap();
        assert_eq!(winapi.target.as_deref(), Some("cfg(windows)"));
        assert!(entry.deps.iter().any(|d| d.name == "itoa" && d.req == "1"));
    }
}
