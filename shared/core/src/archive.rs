//! A `.crate` archive read as data: a file at its top, and the index entry its manifest
//! describes (as crates.io would publish it). Nothing in it is obeyed.

use std::collections::BTreeMap;
use std::io::Read as _;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::index::{IndexDependency, IndexEntry};

/// The index entry of the package in `archive`, its checksum the archive's.
pub fn index_entry(archive: &[u8]) -> anyhow::Result<IndexEntry> {
    let cksum = hex::encode(Sha256::digest(archive));
    entry_of_manifest(&manifest_of(archive)?, cksum)
}

/// The top-level `Cargo.toml` of a `.crate` archive (`<name>-<version>/Cargo.toml`).
fn manifest_of(archive: &[u8]) -> anyhow::Result<toml::Table> {
    let text = top_level_file(archive, "Cargo.toml")?
        .context("no Cargo.toml at the top of the archive")?;
    Ok(toml::from_str(&text)?)
}

/// A regular file at the top of a `.crate` archive (`<name>-<version>/<file>`), at most 4 MiB.
pub fn top_level_file(archive: &[u8], name: &str) -> anyhow::Result<Option<String>> {
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

fn entry_of_manifest(manifest: &toml::Table, cksum: String) -> anyhow::Result<IndexEntry> {
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
        let entry = entry_of_manifest(&manifest, "00".into()).unwrap();
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
