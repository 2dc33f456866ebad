//! Packs the fixture crates of `testkit/fixtures/` into real `.crate` archives, one per outcome
//! class, and loads them as a registry corpus.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use quarry_registry::Corpus;

/// The directory holding the fixture crates and `expected.json`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Command lines of the live processes running a build script of `fixture`: a build the tests
/// expect killed must leave none.
pub fn build_script_processes(fixture: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(fixture) && cmdline.contains("build-script"))
        .collect()
}

/// Packs every fixture into `<out>/<name>-<version>.crate` and loads them as a corpus.
pub fn corpus(out: &Path) -> anyhow::Result<Corpus> {
    pack_all(&dir(), out)
}

/// Packs every crate directly in `from` into `out` and loads them as a corpus.
fn pack_all(from: &Path, out: &Path) -> anyhow::Result<Corpus> {
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            pack(&path, out).with_context(|| format!("cannot pack {}", path.display()))?;
        }
    }
    Corpus::load(&[out.to_owned()])
}

/// The fixtures of one directory of `testkit/fixtures/` (such as `lints`), packed into `out`
/// and loaded as a corpus.
pub fn group(name: &str, out: &Path) -> anyhow::Result<Corpus> {
    pack_all(&dir().join(name), out)
}

/// The preparation fixtures of `testkit/fixtures/prepare/`, one per rule Quarry applies to a
/// published package before resolving it and one per reason it can be broken for, packed into
/// `out` and loaded as a corpus: `quarry-prepare-dep` first, its checksum filled in where a
/// lockfile names it (`@CHECKSUM@`), and `quarry-prepare-yanked@1.0.0` yanked.
pub fn prepare_corpus(out: &Path) -> anyhow::Result<Corpus> {
    use sha2::Digest as _;
    let fixtures = dir().join("prepare");
    let dep = pack(&fixtures.join("dep"), out)?;
    let checksum = hex::encode(sha2::Sha256::digest(std::fs::read(dep)?));
    for entry in std::fs::read_dir(&fixtures)? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() && path.file_name() != Some("dep".as_ref()) {
            let filled = tempfile::tempdir()?;
            copy_filled(&path, filled.path(), &[("@CHECKSUM@", &checksum)])?;
            pack(filled.path(), out).with_context(|| format!("cannot pack {}", path.display()))?;
        }
    }
    let mut corpus = Corpus::load(&[out.to_owned()])?;
    corpus.yank("quarry-prepare-yanked", "1.0.0")?;
    Ok(corpus)
}

/// Writes `count` tiny, distinct, valid packages (`quarry-bench-<i>` 1.0.0: a manifest and an
/// empty library) into `out` as `.crate` files and loads them as a corpus: a registry of any size
/// for benchmarks.
pub fn synthetic(out: &Path, count: usize) -> anyhow::Result<Corpus> {
    let sources = tempfile::tempdir()?;
    for i in 0..count {
        write_package(sources.path(), &format!("quarry-bench-{i}"), None, &[], out)?;
    }
    Corpus::load(&[out.to_owned()])
}

/// Writes `count` distinct packages (`quarry-slow-<i>` 1.0.0) whose build script sleeps for
/// `seconds`, into `out` as `.crate` files, and loads them as a corpus: jobs that take as long
/// as a test needs.
pub fn slow(out: &Path, count: usize, seconds: u64) -> anyhow::Result<Corpus> {
    let packages: Vec<(String, u64)> = (0..count)
        .map(|i| (format!("quarry-slow-{i}"), seconds))
        .collect();
    timed(out, &packages)
}

/// Writes packages `name` 1.0.0 whose build script sleeps for the seconds given with each
/// (none for 0), into `out` as `.crate` files, and loads them as a corpus.
pub fn timed(out: &Path, packages: &[(String, u64)]) -> anyhow::Result<Corpus> {
    let sources = tempfile::tempdir()?;
    for (name, seconds) in packages {
        let build = (*seconds > 0).then(|| {
            format!(
                "fn main() {{\n    std::thread::sleep(std::time::Duration::from_secs({seconds}));\n}}\n"
            )
        });
        write_package(sources.path(), name, build.as_deref(), &[], out)?;
    }
    Corpus::load(&[out.to_owned()])
}

/// Writes packages `name` 1.0.0, each an empty library depending on the packages named with it
/// (`"1"` of each, from the same registry), into `out` as `.crate` files, and loads them as a
/// corpus: dependency trees of chosen sizes.
pub fn trees(out: &Path, packages: &[(&str, &[&str])]) -> anyhow::Result<Corpus> {
    let sources = tempfile::tempdir()?;
    for (name, dependencies) in packages {
        write_package(sources.path(), name, None, dependencies, out)?;
    }
    Corpus::load(&[out.to_owned()])
}

/// Writes a package `name` 1.0.0 (an empty library, `build` as its build script, depending on
/// `"1"` of each of `dependencies`) under `sources` and packs it into `out`.
fn write_package(
    sources: &Path,
    name: &str,
    build: Option<&str>,
    dependencies: &[&str],
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let dir = sources.join(name);
    std::fs::create_dir_all(dir.join("src"))?;
    let dependencies: String = dependencies
        .iter()
        .map(|d| format!("{d} = \"1\"\n"))
        .collect();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"1.0.0\"\nedition = \"2021\"\n\
             description = \"Quarry test package\"\nlicense = \"MIT\"\n\
             [dependencies]\n{dependencies}"
        ),
    )?;
    std::fs::write(dir.join("src/lib.rs"), "")?;
    if let Some(build) = build {
        std::fs::write(dir.join("build.rs"), build)?;
    }
    pack(&dir, out)
}

/// The archive bomb's payload: zeros, past the consumer's unpacking limit (1 GiB).
const BOMB_BYTES: u64 = 3 << 29;

/// What the hostile fixtures' files name, filled in when they are packed.
pub struct Placeholders<'a> {
    /// `@OUTSIDE@`: an address standing for the outside world (`host:port`).
    pub outside: &'a str,
    /// `@MARKER@`: a directory where anything run on the host would leave a file.
    pub marker: &'a Path,
    /// `@VICTIM@`: a directory of the host holding files a fixture would have the consumer
    /// remove for it (through a link it plants).
    pub victim: &'a Path,
}

/// The hostile fixtures of `testkit/fixtures/hostile/`, one per way a package could try to steer
/// what runs outside the sandbox, packed into `out` beside `quarry-fixture-pass` (the registry
/// dependency they resolve) and the escape fixture, and loaded as a corpus.
pub fn hostile_corpus(out: &Path, fill: &Placeholders<'_>) -> anyhow::Result<Corpus> {
    for entry in std::fs::read_dir(dir().join("hostile"))? {
        let template = entry?.path();
        if template.join("Cargo.toml").is_file() {
            pack_hostile(&template, out, fill)?;
        }
    }
    for regular in ["pass", "sandboxed"] {
        pack(&dir().join(regular), out)?;
    }
    Corpus::load(&[out.to_owned()])
}

/// The hostile patch `hostile/patches/NAME` (a `.crate` to upload with a patch run), filled in
/// and packed into `out`, as [`hostile_corpus`] does.
pub fn hostile_patch(name: &str, out: &Path, fill: &Placeholders<'_>) -> anyhow::Result<PathBuf> {
    pack_hostile(&dir().join("hostile/patches").join(name), out, fill)
}

/// Packs the hostile fixture `template` into `out`, its placeholders filled in, with
/// `hostile/lib.rs` as its library unless it has its own, and with what `<template>.beside/`
/// holds beside the package's own directory.
fn pack_hostile(template: &Path, out: &Path, fill: &Placeholders<'_>) -> anyhow::Result<PathBuf> {
    let marker = fill.marker.display().to_string();
    let victim = fill.victim.display().to_string();
    let fills = [
        ("@OUTSIDE@", fill.outside),
        ("@MARKER@", marker.as_str()),
        ("@VICTIM@", victim.as_str()),
    ];
    let filled = tempfile::tempdir()?;
    let crate_dir = filled.path().join("crate");
    copy_filled(template, &crate_dir, &fills)?;
    let lib = crate_dir.join("src/lib.rs");
    if !lib.exists() {
        std::fs::create_dir_all(crate_dir.join("src"))?;
        std::fs::copy(dir().join("hostile/lib.rs"), lib)?;
    }
    let beside_template = template.with_extension("beside");
    let beside = filled.path().join("beside");
    if beside_template.is_dir() {
        copy_filled(&beside_template, &beside, &fills)?;
    }
    // `<template>.links`: lines `PATH -> TARGET`, each a link in the archive with a file
    // written through it after (what `cargo package` never makes).
    let mut links = Vec::new();
    if let Ok(text) = std::fs::read_to_string(template.with_extension("links")) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (path, target) = line
                .split_once(" -> ")
                .with_context(|| format!("{line:?} is not `PATH -> TARGET`"))?;
            let mut target = target.trim().to_owned();
            for (placeholder, value) in &fills {
                target = target.replace(placeholder, value);
            }
            links.push((path.trim().to_owned(), target));
        }
    }
    pack_with(
        &crate_dir,
        out,
        beside_template.is_dir().then_some(beside.as_path()),
        &links,
    )
    .with_context(|| format!("cannot pack {}", template.display()))
}

/// Copies the tree `from` to `to`, replacing each (placeholder, value) in every file.
fn copy_filled(from: &Path, to: &Path, fills: &[(&str, &str)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_filled(&entry.path(), &target, fills)?;
        } else {
            let mut text = std::fs::read_to_string(entry.path())?;
            for (placeholder, value) in fills {
                text = text.replace(placeholder, value);
            }
            std::fs::write(target, text)?;
        }
    }
    Ok(())
}

/// Packs the crate in `crate_dir` into `<out>/<name>-<version>.crate`, as `cargo package` would
/// lay it out, and returns the file's path.
pub fn pack(crate_dir: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    pack_with(crate_dir, out, None, &[])
}

/// [`pack`], with the tree `beside` added at the archive's top, beside the package's own
/// directory, where no real package has anything, and for each (path, target) of `links` a
/// link at that path in the package's directory and then a file `planted` through it.
fn pack_with(
    crate_dir: &Path,
    out: &Path,
    beside: Option<&Path>,
    links: &[(String, String)],
) -> anyhow::Result<PathBuf> {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(crate_dir.join("Cargo.toml"))?)?;
    let package = manifest["package"].as_table().context("no [package]")?;
    let name = package["name"].as_str().context("no package name")?;
    let version = package["version"].as_str().context("no package version")?;
    let root = format!("{name}-{version}");
    let packed = out.join(format!("{root}.crate"));
    let file = std::fs::File::create(&packed)?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::default(),
    ));
    tar.append_dir_all(&root, crate_dir)?;
    if let Some(beside) = beside {
        for entry in std::fs::read_dir(beside)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                tar.append_dir_all(entry.file_name(), entry.path())?;
            } else {
                tar.append_path_with_name(entry.path(), entry.file_name())?;
            }
        }
    }
    for (path, target) in links {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        tar.append_link(&mut link, format!("{root}/{path}"), target)?;
        let planted = b"planted through a link in the archive\n";
        let mut file = tar::Header::new_gnu();
        file.set_size(planted.len() as u64);
        file.set_mode(0o644);
        file.set_cksum();
        tar.append_data(&mut file, format!("{root}/{path}/planted"), &planted[..])?;
    }
    if name == "quarry-fixture-archive-bomb" {
        let mut header = tar::Header::new_gnu();
        header.set_size(BOMB_BYTES);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("{root}/zeros"),
            std::io::repeat(0).take(BOMB_BYTES),
        )?;
    }
    tar.into_inner()?.finish()?;
    Ok(packed)
}
