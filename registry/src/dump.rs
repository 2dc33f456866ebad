//! Writes a database dump in crates.io's format (`db-dump.tar.gz`): a gzipped tarball holding
//! `<timestamp>/README.md`, `metadata.json` and `data/<table>.csv`, the tables in dependency order
//! (`crates` before `versions` before `dependencies`) with crates.io's public columns. The local
//! registry serves its corpus's dump, and the benchmarks generate large synthetic ones.
//!
//! Tables are written to temporary files first: a tar header needs each file's size.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;

use anyhow::Context as _;

use crate::Corpus;

const CRATES: &[&str] = &[
    "created_at",
    "description",
    "documentation",
    "homepage",
    "id",
    "max_features",
    "max_upload_size",
    "name",
    "readme",
    "repository",
    "updated_at",
];
const CRATE_DOWNLOADS: &[&str] = &["crate_id", "downloads"];
const VERSIONS: &[&str] = &[
    "bin_names",
    "categories",
    "checksum",
    "crate_id",
    "crate_size",
    "created_at",
    "description",
    "documentation",
    "downloads",
    "edition",
    "features",
    "has_lib",
    "homepage",
    "id",
    "keywords",
    "license",
    "links",
    "num",
    "num_no_build",
    "published_by",
    "repository",
    "rust_version",
    "updated_at",
    "yanked",
];
const DEPENDENCIES: &[&str] = &[
    "crate_id",
    "default_features",
    "explicit_name",
    "features",
    "id",
    "kind",
    "optional",
    "req",
    "target",
    "version_id",
];

/// How a dependency is used, numbered as in crates.io's `dependencies.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencyKind {
    Normal = 0,
    Build = 1,
    Dev = 2,
}

/// Builds a dump table by table; [`DumpWriter::finish`] writes the archive.
pub struct DumpWriter {
    dir: tempfile::TempDir,
    crates: csv::Writer<BufWriter<File>>,
    crate_downloads: csv::Writer<BufWriter<File>>,
    versions: csv::Writer<BufWriter<File>>,
    dependencies: csv::Writer<BufWriter<File>>,
    next_dependency: u64,
}

impl DumpWriter {
    pub fn new() -> anyhow::Result<DumpWriter> {
        let dir = tempfile::tempdir()?;
        let table = |name: &str, columns: &[&str]| -> anyhow::Result<csv::Writer<_>> {
            let file = File::create(dir.path().join(format!("{name}.csv")))?;
            let mut writer = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, file));
            writer.write_record(columns)?;
            Ok(writer)
        };
        Ok(DumpWriter {
            crates: table("crates", CRATES)?,
            crate_downloads: table("crate_downloads", CRATE_DOWNLOADS)?,
            versions: table("versions", VERSIONS)?,
            dependencies: table("dependencies", DEPENDENCIES)?,
            dir,
            next_dependency: 1,
        })
    }

    pub fn add_crate(&mut self, id: u32, name: &str, downloads: u64) -> anyhow::Result<()> {
        let id = id.to_string();
        let when = "2024-01-01 00:00:00.000000+00";
        self.crates.write_record([
            when,
            // Commas, quotes and newlines, as real descriptions have: the reader must parse CSV.
            &format!("The \"{name}\" crate, for tests,\nwith a second line"),
            "",
            "",
            &id,
            "",
            "",
            name,
            "",
            "",
            when,
        ])?;
        self.crate_downloads
            .write_record([id.as_str(), &downloads.to_string()])?;
        Ok(())
    }

    pub fn add_version(
        &mut self,
        id: u32,
        crate_id: u32,
        num: &str,
        yanked: bool,
        checksum: &str,
    ) -> anyhow::Result<()> {
        let when = "2024-01-01 00:00:00.000000+00";
        let num_no_build = num.split('+').next().unwrap_or(num);
        self.versions.write_record([
            "{}",
            "{}",
            checksum,
            &crate_id.to_string(),
            "",
            when,
            "",
            "",
            "0",
            "2021",
            r#"{"default":[]}"#,
            "t",
            "",
            &id.to_string(),
            "{}",
            "MIT",
            "",
            num,
            num_no_build,
            "",
            "",
            "",
            when,
            if yanked { "t" } else { "f" },
        ])?;
        Ok(())
    }

    pub fn add_dependency(
        &mut self,
        version_id: u32,
        crate_id: u32,
        req: &str,
        kind: DependencyKind,
    ) -> anyhow::Result<()> {
        let id = self.next_dependency;
        self.next_dependency += 1;
        self.dependencies.write_record([
            &crate_id.to_string(),
            "t",
            "",
            "{}",
            &id.to_string(),
            &(kind as u8).to_string(),
            "f",
            req,
            "",
            &version_id.to_string(),
        ])?;
        Ok(())
    }

    /// Writes the archive to `out`, stamped with `timestamp` (RFC 3339) as crates.io does.
    pub fn finish(mut self, out: &Path, timestamp: &str) -> anyhow::Result<()> {
        for table in [
            &mut self.crates,
            &mut self.crate_downloads,
            &mut self.versions,
            &mut self.dependencies,
        ] {
            table.flush()?;
        }
        let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            BufWriter::with_capacity(1 << 20, file),
            flate2::Compression::fast(),
        ));
        let root = timestamp.replace([':', ' '], "-");
        let mut add_bytes = |name: String, bytes: &[u8]| -> std::io::Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, bytes)
        };
        add_bytes(
            format!("{root}/README.md"),
            b"# crates.io Database Dump\n\nWritten by quarry-registry in crates.io's format.\n",
        )?;
        let metadata = serde_json::json!({
            "timestamp": timestamp,
            "crates_io_commit": "quarry-registry",
        });
        add_bytes(
            format!("{root}/metadata.json"),
            serde_json::to_string_pretty(&metadata)?.as_bytes(),
        )?;
        for table in ["crate_downloads", "crates", "versions", "dependencies"] {
            tar.append_path_with_name(
                self.dir.path().join(format!("{table}.csv")),
                format!("{root}/data/{table}.csv"),
            )?;
        }
        tar.into_inner()?.finish()?.flush()?;
        Ok(())
    }
}

/// Writes the dump of a corpus: every crate and version it serves, with their checksums and
/// dependencies; "downloads" are the number of dependents, as in the registry's listing.
pub fn write_corpus_dump(corpus: &Corpus, out: &Path, timestamp: &str) -> anyhow::Result<()> {
    let mut dump = DumpWriter::new()?;
    let downloads = corpus.dependents();
    let ids: std::collections::BTreeMap<&str, u32> = corpus
        .crates
        .keys()
        .zip(1..)
        .map(|(name, id)| (name.as_str(), id))
        .collect();
    let mut version_id = 0;
    for (name, versions) in &corpus.crates {
        let crate_id = ids[name.as_str()];
        // The published spelling, which may differ in case from the index's lower-case key.
        let published = versions.first().map_or(name.as_str(), |p| &p.entry.name);
        dump.add_crate(
            crate_id,
            published,
            downloads.get(name).copied().unwrap_or(0),
        )?;
        for version in versions {
            version_id += 1;
            let entry = &version.entry;
            dump.add_version(
                version_id,
                crate_id,
                &entry.vers,
                entry.yanked,
                &entry.cksum,
            )?;
            for dep in entry.deps.iter().filter(|d| d.registry.is_none()) {
                let dependency = dep.crate_name();
                // A dependency outside the corpus has no crate row; crates.io has them all.
                let Some(&dependency_id) = ids.get(dependency.to_ascii_lowercase().as_str()) else {
                    continue;
                };
                let kind = match dep.kind.as_deref() {
                    Some("build") => DependencyKind::Build,
                    Some("dev") => DependencyKind::Dev,
                    _ => DependencyKind::Normal,
                };
                dump.add_dependency(version_id, dependency_id, &dep.req, kind)?;
            }
        }
    }
    dump.finish(out, timestamp)
}
