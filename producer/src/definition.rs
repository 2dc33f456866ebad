//! A run's definition: which packages it covers (`Selection`, narrowed by a `Filter`), on
//! which sides, and the checks its parts pass before anything is recorded (package lists,
//! package specs, run names, patches, toolchain files).

use anyhow::Context as _;
use quarry_core::job::{Experiment, Patch, StoredDefinition, Toolchain, ToolchainFile};
use quarry_infra::Config;
use quarry_infra::registry::RegistryClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::selection::Filter;

/// Which packages a run covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Selection {
    /// Page the registry's crate listing, in `sort` order, stopping after `limit` crates.
    Listing { sort: Sort, limit: Option<u64> },
    /// Exactly these packages (`name` for the newest version, or `name@version`).
    Packages { packages: Vec<String> },
    /// The crates of a crates.io database dump (`db-dump.tar.gz`), in `sort` order, stopping
    /// after `limit` crates.
    Dump {
        path: std::path::PathBuf,
        sort: Sort,
        limit: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sort {
    /// Alphabetical, as the registry lists them.
    Alpha,
    /// Most downloaded first.
    Downloads,
}

impl Sort {
    pub(crate) fn as_query(self) -> &'static str {
        match self {
            Sort::Alpha => "alpha",
            Sort::Downloads => "downloads",
        }
    }
}

/// Everything that defines a run; stored with it, and compared when a run is resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDefinition {
    pub toolchains: Vec<Toolchain>,
    pub experiment: Experiment,
    pub selection: Selection,
    /// What is taken of each selected crate, and which crates are kept.
    #[serde(default, skip_serializing_if = "Filter::is_default")]
    pub filter: Filter,
    /// A dependency-patch run: each package is tested as published (*start*) and with this
    /// dependency replaced (*end*), with the run's one toolchain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Patch>,
    /// Toolchains given as files (`--toolchain-file`), uploaded with the run: each names one of
    /// `toolchains`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub toolchain_files: Vec<quarry_core::job::ToolchainFile>,
}

impl RunDefinition {
    /// The part of the definition every component reads (`StoredDefinition`): the run's sides
    /// and what rebuilds its jobs. The one way the producer names its sides.
    pub fn stored(&self) -> StoredDefinition {
        StoredDefinition {
            toolchains: self.toolchains.clone(),
            experiment: self.experiment.clone(),
            patch: self.patch.clone(),
            toolchain_files: self.toolchain_files.clone(),
        }
    }

    /// The definition stored with `run`.
    pub fn of(run: &quarry_infra::store::Run) -> anyhow::Result<RunDefinition> {
        serde_json::from_value(run.definition.clone()).with_context(|| {
            format!(
                "run {} has a definition this producer cannot read",
                run.name
            )
        })
    }
}

/// Reads a package list: one `name` or `name@version` per line; blank lines and `#` comments
/// are ignored. Every line is checked, and the first bad one is named in the error.
pub fn read_package_list(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the package list {}", path.display()))?;
    let mut packages = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        check_package_spec(line).with_context(|| {
            format!("{}:{}: invalid entry {line:?}", path.display(), number + 1)
        })?;
        packages.push(line.to_owned());
    }
    anyhow::ensure!(
        !packages.is_empty(),
        "the package list {} names no package",
        path.display()
    );
    Ok(packages)
}

/// `name` or `name@version`, as crates.io allows them.
pub fn check_package_spec(spec: &str) -> anyhow::Result<()> {
    let (name, version) = match spec.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{name:?} is not a crate name"
    );
    if let Some(version) = version {
        semver::Version::parse(version)
            .with_context(|| format!("{version:?} is not a semver version"))?;
    }
    Ok(())
}

/// Turns `--patch NAME=VERSION` (a version the registry serves) or `--patch NAME=FILE.crate` (a
/// package made by `cargo package`, uploaded to S3 with the run) into the run's patch.
pub async fn resolve_patch(config: &Config, spec: &str) -> anyhow::Result<Patch> {
    let (name, with) = spec
        .split_once('=')
        .with_context(|| format!("--patch {spec:?}: give NAME=VERSION or NAME=FILE.crate"))?;
    check_package_spec(name).context("--patch: the dependency to replace")?;
    let file = std::path::Path::new(with);
    if with.ends_with(".crate") || file.is_file() {
        let not_readable = || format!("--patch: {} is not a readable .crate file", file.display());
        let bytes = std::fs::read(file).with_context(not_readable)?;
        let entry = quarry_core::archive::index_entry(&bytes).with_context(not_readable)?;
        anyhow::ensure!(
            entry.name.eq_ignore_ascii_case(name),
            "--patch: {} is package {}, not {name}",
            file.display(),
            entry.name
        );
        let bucket = quarry_infra::s3::Bucket::new(&config.s3)?;
        bucket.ensure_exists().await?;
        let key = bucket
            .put_patch(&entry.cksum, bytes.into())
            .await
            .context("--patch: cannot upload the package to S3")?;
        return Ok(Patch {
            name: entry.name,
            version: entry.vers,
            checksum: entry.cksum,
            source: quarry_core::job::PatchSource::Upload { key },
        });
    }
    semver::Version::parse(with)
        .with_context(|| format!("--patch: {with:?} is neither a version nor a .crate file"))?;
    let registry = RegistryClient::new(&config.registry)?;
    let entries = registry
        .index_entries(name)
        .await
        .with_context(|| format!("--patch: cannot read {name} from the registry's index"))?;
    let entry = entries
        .iter()
        .find(|e| e.vers == with)
        .with_context(|| format!("--patch: the registry has no {name}@{with}"))?;
    Ok(Patch {
        name: entry.name.clone(),
        version: entry.vers.clone(),
        checksum: entry.cksum.clone(),
        source: quarry_core::job::PatchSource::Registry,
    })
}

/// Turns `--toolchain-file NAME=FILE` into the run's toolchain file: checked to be a tar archive
/// (plain, gzip or xz, as rustup's dist tarballs and CI artifacts are), checksummed, and uploaded
/// to S3 once (a file already there under its checksum is not sent again).
pub async fn resolve_toolchain_file(config: &Config, spec: &str) -> anyhow::Result<ToolchainFile> {
    use std::io::Read as _;
    let (name, path) = spec.split_once('=').with_context(|| {
        format!("--toolchain-file {spec:?}: give NAME=FILE (pr-12345=rust-nightly-x86_64-unknown-linux-gnu.tar.xz)")
    })?;
    let toolchain: Toolchain = name
        .parse()
        .with_context(|| format!("--toolchain-file {spec:?}: the name"))?;
    anyhow::ensure!(
        toolchain.name() == toolchain.as_str(),
        "--toolchain-file {spec:?}: name the toolchain without variants (give those with \
         --toolchain {name}+...)"
    );
    let path = std::path::Path::new(path);
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("--toolchain-file: cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(512);
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("--toolchain-file: cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        if head.len() < 512 {
            let wanted = (512 - head.len()).min(read);
            head.extend_from_slice(&buffer[..wanted]);
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    let compressed = head.starts_with(&[0x1f, 0x8b]) || head.starts_with(b"\xfd7zXZ\0");
    let tar = head.get(257..262) == Some(b"ustar");
    anyhow::ensure!(
        compressed || tar,
        "--toolchain-file: {} is not a tar archive (plain, gzip or xz): give a rustup dist \
         tarball, a CI artifact or a toolchain directory packed with tar",
        path.display()
    );
    let checksum = hex::encode(hasher.finalize());
    let bucket = quarry_infra::s3::Bucket::new(&config.s3)?;
    bucket.ensure_exists().await?;
    let key = bucket
        .put_toolchain(&checksum, path, bytes)
        .await
        .context("--toolchain-file: cannot upload the toolchain to S3")?;
    Ok(ToolchainFile {
        name: name.to_owned(),
        checksum,
        bytes,
        key,
    })
}

/// Run names become directory names in reports: keep them plain.
pub fn validate_run_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    anyhow::ensure!(
        ok,
        "invalid run name {name:?}: use 1 to 64 letters, digits, '.', '-' or '_', not starting with '.'"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lists_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.txt");
        std::fs::write(&good, "# popular\nserde\n\nitoa@1.0.15  # pinned\n").unwrap();
        assert_eq!(read_package_list(&good).unwrap(), ["serde", "itoa@1.0.15"]);

        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "serde\nitoa@one\n").unwrap();
        let err = format!("{:#}", read_package_list(&bad).unwrap_err());
        assert!(err.contains("bad.txt:2"), "{err}");
        assert!(err.contains("not a semver version"), "{err}");

        let err = format!(
            "{:#}",
            read_package_list(&dir.path().join("none.txt")).unwrap_err()
        );
        assert!(err.contains("none.txt"), "{err}");
    }

    #[test]
    fn run_names_are_plain() {
        assert!(validate_run_name("nightly-2026-11-23.check").is_ok());
        assert!(validate_run_name("../etc").is_err());
        assert!(validate_run_name("").is_err());
    }
}
