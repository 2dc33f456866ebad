//! Collects a corpus of real crates with cargo: for each `name@version` of a list, the crate and
//! everything it needs as a workspace root (normal, build, dev and optional dependencies, for
//! every target platform), as `.crate` files the registry can serve whole.
//!
//! Cargo does the downloading (it is the one way these machines reach crates.io), in a
//! throwaway project of Quarry's own: first one that depends on the crate alone (to get its
//! `.crate`), then one that depends on the crate and, renamed, on every dependency its manifest
//! names. So cargo never reads the crate's manifest or configuration as a project of its own:
//! the crate's `Cargo.toml` is read as data (`corpus::read_crate_file`), and nothing of it is run
//! or obeyed. The throwaway's `Cargo.lock` names what to copy out of cargo's download cache.
//!
//! Layout of the corpus directory:
//! - `crates/<name>-<version>.crate`: every crate of every root's closure, once;
//! - `roots/<name>-<version>.lock`: a complete root's lockfile (a root with one is skipped);
//! - `manifest.json`: every root of the last collection, complete or why not, and the count of
//!   crates;
//! - `cargo-home/`: the cargo home the collection downloads into (its own, not the user's).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use quarry_core::index::IndexDependency;
use serde::Serialize;

use crate::corpus::{read_crate_file, shipped_lockfile};

/// One root of a corpus list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Reads a corpus list: one `name@version` per line; `#` starts a comment.
pub fn read_list(text: &str) -> anyhow::Result<Vec<Root>> {
    let mut roots = BTreeSet::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let Some((name, version)) = line.split_once('@') else {
            bail!("line {}: {line:?} is not name@version", number + 1);
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name || semver::Version::parse(version).is_err() {
            bail!("line {}: {line:?} is not name@version", number + 1);
        }
        roots.insert(Root {
            name: name.to_owned(),
            version: version.to_owned(),
        });
    }
    Ok(roots.into_iter().collect())
}

/// What became of one root.
#[derive(Debug, Clone, Serialize)]
pub struct Collected {
    pub name: String,
    pub version: String,
    /// `complete`, or `failed` with the reason.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Crates its closure holds (itself included), when complete.
    pub packages: usize,
}

/// The corpus directory's `manifest.json`.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub roots: Vec<Collected>,
    pub complete: usize,
    pub failed: usize,
    /// `.crate` files in `crates/`.
    pub crates: usize,
}

/// Collects `roots` into `dir`, skipping those already complete, and writes `manifest.json`.
/// A root that cannot be collected is reported with the reason; the others go on.
pub fn collect(roots: &[Root], dir: &Path, cargo: &Path) -> anyhow::Result<Manifest> {
    let crates_dir = dir.join("crates");
    let roots_dir = dir.join("roots");
    for sub in [&crates_dir, &roots_dir] {
        std::fs::create_dir_all(sub).with_context(|| format!("cannot create {}", sub.display()))?;
    }
    let cargo_home = corpus_cargo_home(dir)?;
    let mut collected = Vec::new();
    let started = Instant::now();
    for (i, root) in roots.iter().enumerate() {
        let marker = roots_dir.join(format!("{}-{}.lock", root.name, root.version));
        let progress = format!("[{}/{}] {root}", i + 1, roots.len());
        if let Some(packages) = complete_packages(&marker, &crates_dir) {
            collected.push(Collected::complete(root, packages));
            continue;
        }
        let began = Instant::now();
        match collect_root(root, &crates_dir, &marker, cargo, &cargo_home) {
            Ok(packages) => {
                eprintln!(
                    "{progress}: complete, {packages} crates ({:.1} s)",
                    began.elapsed().as_secs_f64()
                );
                collected.push(Collected::complete(root, packages));
            }
            Err(err) => {
                let reason = format!("{err:#}");
                eprintln!("{progress}: FAILED: {reason}");
                collected.push(Collected {
                    name: root.name.clone(),
                    version: root.version.clone(),
                    status: "failed",
                    reason: Some(reason),
                    packages: 0,
                });
            }
        }
    }
    let crates = std::fs::read_dir(&crates_dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "crate"))
        .count();
    let complete = collected.iter().filter(|c| c.status == "complete").count();
    let manifest = Manifest {
        failed: collected.len() - complete,
        complete,
        roots: collected,
        crates,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    eprintln!(
        "{} of {} roots complete ({} failed), {crates} crates, in {:.0} s",
        manifest.complete,
        roots.len(),
        manifest.failed,
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

impl Collected {
    fn complete(root: &Root, packages: usize) -> Collected {
        Collected {
            name: root.name.clone(),
            version: root.version.clone(),
            status: "complete",
            reason: None,
            packages,
        }
    }
}

/// The number of crates of a root already collected: its lockfile is there and every crate it
/// names is in `crates/`.
fn complete_packages(marker: &Path, crates_dir: &Path) -> Option<usize> {
    let lock = std::fs::read_to_string(marker).ok()?;
    let packages = registry_packages(&lock).ok()?;
    packages
        .iter()
        .all(|(name, version)| crates_dir.join(format!("{name}-{version}.crate")).is_file())
        .then_some(packages.len())
}

fn collect_root(
    root: &Root,
    crates_dir: &Path,
    marker: &Path,
    cargo: &Path,
    cargo_home: &Path,
) -> anyhow::Result<usize> {
    let work = tempfile::Builder::new()
        .prefix("quarry-corpus-")
        .tempdir()
        .context("cannot create a throwaway project")?;
    // The crate itself, with what it needs to build.
    let direct = format!(
        "[dependencies]\n{} = {{ version = \"={}\" }}\n",
        toml_key(&root.name),
        root.version
    );
    let lock = fetch(work.path(), &direct, cargo, cargo_home)?;
    let archive = cached_crate(cargo_home, &root.name, &root.version)?;
    let published =
        read_crate_file(&archive).with_context(|| format!("cannot read the manifest of {root}"))?;
    // Then everything its manifest names, as a workspace root would resolve it.
    let mut manifest = direct;
    let mut targets: std::collections::BTreeMap<String, String> = Default::default();
    for (i, dep) in published.entry.deps.iter().enumerate() {
        if dep.registry.is_some() {
            continue; // Another registry's: not crates.io's to collect.
        }
        let line = format!("quarry-dep-{i} = {}\n", dependency(dep));
        match &dep.target {
            Some(target) => targets.entry(target.clone()).or_default().push_str(&line),
            None => manifest.push_str(&line),
        }
    }
    for (target, lines) in targets {
        manifest.push_str(&format!(
            "\n[target.{}.dependencies]\n{lines}",
            toml::Value::String(target)
        ));
    }
    let lock = if published.entry.deps.is_empty() {
        lock
    } else {
        fetch(work.path(), &manifest, cargo, cargo_home)?
    };
    let mut packages = registry_packages(&lock)?;
    // A package that ships its `Cargo.lock` resolves to what it locks (cargo keeps a valid
    // lockfile, and so does Quarry): those exact versions too, pinned in throwaways of their
    // own, all at once or, when that fails (the lock names a version since yanked, which
    // cargo keeps in a lockfile but will not pick anew), one by one, leaving out what cannot
    // be had. Without them the consumer resolves the package anew and says so.
    let mut lock = lock;
    if let Some(shipped) = shipped_lockfile(&archive)? {
        let locked: Vec<(String, String)> = registry_packages(&shipped)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !packages.contains(p))
            .filter(|(name, version)| !crates_dir.join(format!("{name}-{version}.crate")).is_file())
            .collect();
        let mut pinned_locks = Vec::new();
        if !locked.is_empty() {
            match fetch(
                &work.path().join("locked"),
                &pinned(&locked),
                cargo,
                cargo_home,
            ) {
                Ok(pinned_lock) => pinned_locks.push(pinned_lock),
                Err(_) => {
                    for (i, package) in locked.iter().enumerate() {
                        let project = work.path().join(format!("locked-{i}"));
                        if let Ok(pinned_lock) = fetch(
                            &project,
                            &pinned(std::slice::from_ref(package)),
                            cargo,
                            cargo_home,
                        ) {
                            pinned_locks.push(pinned_lock);
                        }
                    }
                }
            }
        }
        for pinned_lock in pinned_locks {
            for package in registry_packages(&pinned_lock)? {
                if !packages.contains(&package) {
                    packages.push(package);
                }
            }
            // The marker names every crate collected for the root.
            lock.push_str("\n# versions its own Cargo.lock names\n");
            for line in pinned_lock.lines() {
                // One lockfile `version` key per file: the later ones are kept as comments.
                let format_version = line
                    .strip_prefix("version = ")
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()));
                if format_version {
                    lock.push_str("# ");
                }
                lock.push_str(line);
                lock.push('\n');
            }
        }
    }
    for (name, version) in &packages {
        let into = crates_dir.join(format!("{name}-{version}.crate"));
        if into.is_file() {
            continue;
        }
        let from = cached_crate(cargo_home, name, version)?;
        // Copied under a temporary name, then renamed: an interrupted copy is never taken for
        // a complete one.
        let partial = into.with_extension("crate.partial");
        let _ = std::fs::remove_file(&partial);
        if std::fs::hard_link(&from, &partial).is_err() {
            std::fs::copy(&from, &partial)
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
        std::fs::rename(&partial, &into)?;
    }
    std::fs::write(marker, &lock)?;
    Ok(packages.len())
}

/// Writes the throwaway project's manifest and has cargo resolve and download it (from what it
/// has cached when it can, else from crates.io); returns the lockfile.
fn fetch(project: &Path, dependencies: &str, cargo: &Path, home: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(project.join("src"))?;
    std::fs::write(project.join("src/lib.rs"), "")?;
    std::fs::write(
        project.join("Cargo.toml"),
        format!(
            "[package]\nname = \"quarry-corpus-root\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[workspace]\n\n{dependencies}"
        ),
    )?;
    let _ = std::fs::remove_file(project.join("Cargo.lock"));
    let offline = run_cargo(project, cargo, home, &["fetch", "--offline"]);
    if offline.is_err() {
        let _ = std::fs::remove_file(project.join("Cargo.lock"));
        run_cargo(project, cargo, home, &["fetch"])?;
    }
    std::fs::read_to_string(project.join("Cargo.lock")).context("cargo wrote no Cargo.lock")
}

fn run_cargo(project: &Path, cargo: &Path, home: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(cargo)
        .args(args)
        .arg("--quiet")
        .current_dir(project)
        .env("CARGO_HOME", home)
        // No toolchain file of anyone's applies here, and nothing is built.
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .with_context(|| format!("cannot run {}", cargo.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Blocking waiting"))
        .take(6)
        .collect();
    bail!("cargo {}: {}", args.join(" "), error.join(" / "))
}

/// A dependency of the root, as an inline table of the throwaway manifest (renamed, so that
/// several requirements on one crate can stand side by side).
fn dependency(dep: &IndexDependency) -> String {
    let mut table = toml::Table::new();
    table.insert("package".into(), dep.crate_name().into());
    table.insert("version".into(), dep.req.clone().into());
    if !dep.default_features {
        table.insert("default-features".into(), false.into());
    }
    if !dep.features.is_empty() {
        table.insert(
            "features".into(),
            toml::Value::Array(dep.features.iter().cloned().map(Into::into).collect()),
        );
    }
    toml::Value::Table(table).to_string()
}

/// Dependencies pinned to exact versions, for a throwaway manifest.
fn pinned(packages: &[(String, String)]) -> String {
    let mut table = String::from("[dependencies]\n");
    for (i, (name, version)) in packages.iter().enumerate() {
        table.push_str(&format!(
            "quarry-locked-{i} = {{ package = {}, version = \"={version}\" }}\n",
            toml_key(name)
        ));
    }
    table
}

fn toml_key(name: &str) -> String {
    toml::Value::String(name.to_owned()).to_string()
}

/// The crates.io packages of a lockfile, as (name, version).
fn registry_packages(lock: &str) -> anyhow::Result<Vec<(String, String)>> {
    let lock: toml::Table = toml::from_str(lock).context("cannot read the lockfile")?;
    let packages = lock
        .get("package")
        .and_then(toml::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    Ok(packages
        .iter()
        .filter_map(toml::Value::as_table)
        .filter(|p| {
            p.get("source")
                .and_then(toml::Value::as_str)
                .is_some_and(|s| s.starts_with("registry+") || s.starts_with("sparse+"))
        })
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_owned(),
                p.get("version")?.as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// The cargo home the collection downloads into: the corpus's own (`<dir>/cargo-home`), so that
/// thousands of crates do not land in the user's download cache (which Quarry's tests serve),
/// with the user's cargo configuration, if any, so that a mirror or proxy they set still applies.
fn corpus_cargo_home(dir: &Path) -> anyhow::Result<PathBuf> {
    let home = std::path::absolute(dir.join("cargo-home"))?;
    std::fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
    let user = match std::env::var_os("CARGO_HOME") {
        Some(home) => Some(PathBuf::from(home)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")),
    };
    if let Some(user) = user {
        for config in ["config.toml", "config"] {
            if user.join(config).is_file() {
                std::fs::copy(user.join(config), home.join(config))?;
            }
        }
    }
    Ok(home)
}

/// A `.crate` file in cargo's download cache (one directory per registry source).
fn cached_crate(cargo_home: &Path, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let cache = cargo_home.join("registry/cache");
    let file = format!("{name}-{version}.crate");
    for source in std::fs::read_dir(&cache)
        .with_context(|| format!("cannot read cargo's cache {}", cache.display()))?
    {
        let candidate = source?.path().join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cargo fetched {name}@{version} but {file} is not in {}",
        cache.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_name_at_version_per_line_and_bad_lines_are_named() {
        let roots =
            read_list("# roots\nserde@1.0.228\n\nlibc@0.2.177  # a -sys-like\nserde@1.0.228\n")
                .unwrap();
        assert_eq!(
            roots.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["libc@0.2.177", "serde@1.0.228"]
        );
        let err = read_list("serde\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = read_list("ok@1.0.0\n../x@1.0.0\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_lockfile_names_its_registry_packages() {
        let lock = r#"
version = 4

[[package]]
name = "quarry-corpus-root"
version = "0.0.0"

[[package]]
name = "itoa"
version = "1.0.15"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "abc"
"#;
        assert_eq!(
            registry_packages(lock).unwrap(),
            [("itoa".to_owned(), "1.0.15".to_owned())]
        );
    }
}
