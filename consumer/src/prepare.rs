//! Preparing an unpacked package for cargo, where the trust boundary starts: every byte of the
//! package is hostile, and cargo obeys whatever configuration and manifest it finds. Before any
//! cargo command, and again before each later step (a build script may have written one):
//!
//! - the override files a package can ship (`.cargo/config[.toml]`, `rust-toolchain[.toml]`)
//!   are removed from the package's directory and every directory above it up to the job's
//!   scratch directory, as rustwide does; a removed cargo configuration that would run a
//!   program or send cargo elsewhere is named ([`Refusal::HostileConfig`]);
//! - the manifest is read as data: a dependency (or `[patch]`, `[replace]`) from git or another
//!   registry, and any path leading out of the package, is refused with a precise reason, and
//!   the job ends `broken` instead of cargo ever being asked to fetch it;
//! - the manifest is repaired as Crater's rustwide does, each change said in the job's log:
//!   `[[bin]]`, `[[example]]`, `[[test]]` and `[[bench]]` entries whose files are not in the
//!   package are dropped (crates.io packages often exclude them), `package.workspace` is
//!   removed, and so are the obsolete `publish-lockfile` and `default-run` cargo features;
//!   a shipped `Cargo.lock` is kept if it is a lockfile, removed (and regenerated) if not;
//! - the package is made its own workspace root.
//!
//! The job's cargo home, in its scratch directory, holds the only configuration cargo reads
//! besides what is removed here: Quarry's own ([`write_cargo_home`]).

use std::fmt::Write as _;
use std::path::{Component, Path};

use quarry_core::job::Refusal;

use crate::gateway::REGISTRY_HOST;

/// Cargo configuration files a package might ship, relative to a directory cargo searches.
const CARGO_CONFIGS: [&str; 2] = [".cargo/config", ".cargo/config.toml"];
/// Toolchain overrides rustup reads from the working directory up.
const TOOLCHAIN_FILES: [&str; 2] = ["rust-toolchain", "rust-toolchain.toml"];
/// Larger manifests or configurations are not read (nothing real comes close).
const MAX_TOML_BYTES: u64 = 4 << 20;

/// The settings of a cargo configuration that run a program, change where cargo downloads
/// from or what it sends, or change what commands mean (dotted prefixes; `target.*` and
/// `host.*` are matched by [`hostile_settings`]).
const HOSTILE_SETTINGS: [&str; 17] = [
    "source",
    "registries",
    "registry",
    "credential-alias",
    "http",
    "net",
    "env",
    "alias",
    "include",
    "paths",
    "build.rustc",
    "build.rustc-wrapper",
    "build.rustc-workspace-wrapper",
    "build.rustdoc",
    "build.target-dir",
    "doc.browser",
    "unstable",
];

/// What the trust boundary found in a job: each refusal with what the log says of it, and
/// (without a refusal) each change preparing the package made to it.
#[derive(Debug, Default)]
pub struct Refused {
    found: Vec<(Option<Refusal>, String)>,
    /// An override file could not be removed: cargo must not run with it in place.
    stuck: bool,
}

impl Refused {
    pub fn add(&mut self, refusal: Refusal, detail: String) {
        self.found.push((Some(refusal), detail));
    }

    /// A change preparing the package made to it, for the log.
    pub fn changed(&mut self, detail: String) {
        self.found.push((None, detail));
    }

    /// The distinct refusals, in order, for the result.
    pub fn refusals(&self) -> Vec<Refusal> {
        let mut refusals: Vec<Refusal> = self.found.iter().filter_map(|(r, _)| *r).collect();
        refusals.sort();
        refusals.dedup();
        refusals
    }

    /// Whether what was refused leaves the job nothing to build.
    pub fn ends_the_job(&self) -> bool {
        self.stuck
            || self
                .found
                .iter()
                .any(|(r, _)| r.is_some_and(|r| r.ends_the_job()))
    }

    /// The job-log lines for what was found since `from` (an earlier `len`).
    pub fn log_lines(&self, from: usize) -> String {
        let mut lines = String::new();
        for (refusal, detail) in &self.found[from..] {
            let _ = match refusal {
                Some(refusal) => writeln!(lines, "quarry: refused ({refusal}): {detail}"),
                None => writeln!(lines, "quarry: prepared: {detail}"),
            };
        }
        lines
    }

    pub fn len(&self) -> usize {
        self.found.len()
    }
}

/// Prepares the unpacked package at `package_dir` (in the job's `scratch` directory) before
/// anything resolves it: override files removed, the manifest checked and made its own
/// workspace root. What the package tried is added to `refused`; `Err` is a manifest that
/// cannot be read or written.
pub fn package(scratch: &Path, package_dir: &Path, refused: &mut Refused) -> Result<(), String> {
    remove_override_files(scratch, package_dir, refused);
    let manifest = package_dir.join("Cargo.toml");
    let mut parsed = read_toml(&manifest)?;
    let changes = repair_manifest(&mut parsed, package_dir);
    check_manifest(&parsed, package_dir, "", refused);
    check_lockfile(package_dir, refused);
    if changes.is_empty() {
        return make_workspace_root(&manifest, &parsed);
    }
    for change in changes {
        refused.changed(change);
    }
    // Written anew (comments and layout are not kept): cargo reads the same values.
    parsed
        .entry("workspace")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let text = toml::to_string(&parsed).map_err(|e| format!("cannot write Cargo.toml: {e}"))?;
    std::fs::write(&manifest, text).map_err(|e| format!("cannot write Cargo.toml: {e}"))
}

/// The target kinds a manifest lists, with the directory cargo looks in by default.
const TARGET_DIRS: [(&str, &str); 4] = [
    ("bin", "src/bin"),
    ("example", "examples"),
    ("test", "tests"),
    ("bench", "benches"),
];

/// Repairs a published manifest as Crater's rustwide does, returning what it changed: targets
/// whose files are not in the package are dropped (cargo would refuse the whole manifest),
/// `package.workspace` is removed (the package becomes its own workspace root, and a parent is
/// not there), and the obsolete `publish-lockfile` and `default-run` cargo features are taken
/// out with their keys.
fn repair_manifest(manifest: &mut toml::Table, package_dir: &Path) -> Vec<String> {
    let mut changes = Vec::new();
    let package_name = manifest
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned);
    let mut dropped_bins = Vec::new();
    for (kind, dir) in TARGET_DIRS {
        let Some(toml::Value::Array(targets)) = manifest.get_mut(kind) else {
            continue;
        };
        targets.retain(|target| {
            let name = target.get("name").and_then(toml::Value::as_str);
            let candidates: Vec<String> = match (target.get("path"), name) {
                (Some(path), _) => path.as_str().map(str::to_owned).into_iter().collect(),
                (None, Some(name)) => {
                    let mut candidates =
                        vec![format!("{dir}/{name}.rs"), format!("{dir}/{name}/main.rs")];
                    if kind == "bin" && package_name.as_deref() == Some(name) {
                        candidates.push("src/main.rs".to_owned());
                    }
                    candidates
                }
                // Nothing to look for: left to cargo.
                (None, None) => return true,
            };
            // A path out of the package is kept for `check_manifest` to refuse, and not looked
            // for: nothing outside the package is even looked at.
            if candidates.iter().any(|c| leaves(Path::new(c)))
                || candidates.iter().any(|c| package_dir.join(c).is_file())
            {
                return true;
            }
            changes.push(format!(
                "dropped [[{kind}]] `{}`: {} is not in the package",
                name.unwrap_or("?"),
                candidates.first().map(String::as_str).unwrap_or("?")
            ));
            if kind == "bin"
                && let Some(name) = name
            {
                dropped_bins.push(name.to_owned());
            }
            false
        });
    }
    let mut obsolete = Vec::new();
    if let Some(toml::Value::Array(features)) = manifest.get_mut("cargo-features") {
        features.retain(|feature| match feature.as_str() {
            Some(name @ ("publish-lockfile" | "default-run")) => {
                obsolete.push(name.to_owned());
                false
            }
            _ => true,
        });
    }
    if let Some(toml::Value::Table(package)) = manifest.get_mut("package") {
        if let Some(workspace) = package.remove("workspace") {
            changes.push(format!(
                "removed package.workspace = {workspace}: the package is its own workspace root"
            ));
        }
        for feature in &obsolete {
            changes.push(format!("removed the obsolete cargo feature `{feature}`"));
        }
        if package.remove("publish-lockfile").is_some() {
            changes.push("removed the obsolete package.publish-lockfile".to_owned());
        }
        let default_run_gone = package
            .get("default-run")
            .and_then(toml::Value::as_str)
            .is_some_and(|bin| dropped_bins.iter().any(|d| d == bin));
        if (obsolete.iter().any(|f| f == "default-run") || default_run_gone)
            && let Some(run) = package.remove("default-run")
        {
            changes.push(format!("removed package.default-run = {run}"));
        }
    }
    changes
}

/// Keeps a `Cargo.lock` the package ships if it reads as a lockfile cargo knows, and removes it
/// otherwise, so that cargo writes a new one, saying so in the log.
fn check_lockfile(package_dir: &Path, refused: &mut Refused) {
    let lockfile = package_dir.join("Cargo.lock");
    if !is_present(&lockfile) {
        return;
    }
    let why = match read_toml(&lockfile) {
        Err(why) => why,
        Ok(lock) => match lock.get("version").map(toml::Value::as_integer) {
            Some(Some(version)) if !(1..=4).contains(&version) => {
                format!("lockfile version {version}, which this cargo may not know")
            }
            Some(None) => "its version is not a number".to_owned(),
            _ if !matches!(lock.get("package"), None | Some(toml::Value::Array(_))) => {
                "its [[package]] entries are not a list".to_owned()
            }
            // Kept as it is: nothing to say.
            _ => return,
        },
    };
    if remove(&lockfile, refused) {
        refused.changed(format!(
            "the package's Cargo.lock is not a valid lockfile ({why}): removed, cargo writes a \
             new one"
        ));
    }
}

/// Checks the manifest of a patch's replacement, unpacked at `dir`, as a package's own.
pub fn patch(dir: &Path, name: &str, refused: &mut Refused) -> Result<(), String> {
    let parsed = read_toml(&dir.join("Cargo.toml"))?;
    check_manifest(&parsed, dir, &format!("the patch {name}: "), refused);
    Ok(())
}

/// Removes the override files cargo or rustup would read, run from `package_dir`, in it and in
/// every directory above it up to and including `scratch` (above that, the sandbox shows only
/// directories no job can write to). Run before every step: an earlier step's build script
/// may have left one. This runs outside the sandbox, on a tree earlier steps could write, so
/// it follows no link: a link where a directory should be ends the job, and a link standing
/// for `.cargo` or a configuration is removed itself, never what it points at.
pub fn remove_override_files(scratch: &Path, package_dir: &Path, refused: &mut Refused) {
    let dirs: Vec<&Path> = package_dir
        .ancestors()
        .take_while(|dir| dir.starts_with(scratch))
        .collect();
    if let Some(planted) = dirs.iter().find(|dir| !is_real_dir(dir)) {
        refused.add(
            Refusal::PathOutsidePackage,
            format!(
                "{} is no longer a directory (a link?): not followed",
                shown_path(scratch, planted)
            ),
        );
        return;
    }
    for dir in dirs {
        let dot_cargo = dir.join(".cargo");
        if is_present(&dot_cargo) && !is_real_dir(&dot_cargo) {
            if remove(&dot_cargo, refused) {
                refused.add(
                    Refusal::OverrideFile,
                    format!(
                        "{}: removed (not a directory)",
                        shown_path(scratch, &dot_cargo)
                    ),
                );
            }
            continue;
        }
        for name in CARGO_CONFIGS {
            let path = dir.join(name);
            if !is_present(&path) {
                continue;
            }
            // Only a plain file is read: not through a link, not a FIFO that would never end.
            let plain = path.symlink_metadata().is_ok_and(|m| m.is_file());
            let settings = match plain.then(|| read_toml(&path)) {
                Some(Ok(config)) => hostile_settings(&config),
                _ => Vec::new(),
            };
            if remove(&path, refused) {
                let shown = shown_path(scratch, &path);
                refused.add(
                    Refusal::OverrideFile,
                    format!("{shown}: removed before cargo ran"),
                );
                if !settings.is_empty() {
                    refused.add(
                        Refusal::HostileConfig,
                        format!("{shown} set {}", settings.join(", ")),
                    );
                }
            }
        }
        for name in TOOLCHAIN_FILES {
            let path = dir.join(name);
            if is_present(&path) && remove(&path, refused) {
                refused.add(
                    Refusal::OverrideFile,
                    format!(
                        "{}: removed (the run's toolchain is used)",
                        shown_path(scratch, &path)
                    ),
                );
            }
        }
    }
}

fn is_present(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// A directory itself, not a link to one.
fn is_real_dir(path: &Path) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.is_dir())
}

/// Removes a file (or whatever stands at its name); a failure is itself refused: cargo must
/// not run with it in place.
fn remove(path: &Path, refused: &mut Refused) -> bool {
    let removed = if is_real_dir(path) {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => true,
        Err(err) => {
            refused.add(
                Refusal::OverrideFile,
                format!("cannot remove {}: {err}", path.display()),
            );
            refused.stuck = true;
            false
        }
    }
}

/// A path in the job's log: relative to the scratch directory, which means nothing elsewhere.
fn shown_path(scratch: &Path, path: &Path) -> String {
    path.strip_prefix(scratch)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let size = path
        .metadata()
        .map_err(|e| format!("cannot read {name}: {e}"))?
        .len();
    if size > MAX_TOML_BYTES {
        return Err(format!(
            "{name} is {size} bytes, more than the {MAX_TOML_BYTES} read"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    toml::from_str(&text).map_err(|e| format!("{name} is not valid TOML: {e}"))
}

/// The settings of `config` (a cargo configuration file) that [`HOSTILE_SETTINGS`] names, and
/// the runners, linkers and build-script overrides of its `target.*` and `host.*` tables.
fn hostile_settings(config: &toml::Table) -> Vec<String> {
    let mut found = Vec::new();
    for setting in HOSTILE_SETTINGS {
        let mut value = Some(config);
        let mut parts = setting.split('.').peekable();
        while let (Some(part), Some(table)) = (parts.next(), value) {
            match table.get(part) {
                Some(toml::Value::Table(inner)) if parts.peek().is_some() => value = Some(inner),
                Some(_) if parts.peek().is_none() => {
                    found.push(setting.to_owned());
                    value = None;
                }
                _ => value = None,
            }
        }
    }
    for section in ["target", "host"] {
        let Some(toml::Value::Table(targets)) = config.get(section) else {
            continue;
        };
        for (target, settings) in targets {
            let toml::Value::Table(settings) = settings else {
                continue;
            };
            for (key, value) in settings {
                // `rustflags` only reaches the compiler; a runner or linker runs a program,
                // and a table is a build script's output overridden (`[target.T.LINKS]`).
                if matches!(key.as_str(), "runner" | "linker") || value.is_table() {
                    found.push(format!("{section}.{target}.{key}"));
                }
            }
        }
    }
    found
}

/// The manifest's tables of dependencies: the normal, dev and build ones, per target too, the
/// workspace's, and the `[patch]` and `[replace]` entries (which name dependencies as well).
fn dependency_tables(manifest: &toml::Table) -> Vec<(String, &toml::Table)> {
    const KINDS: [&str; 5] = [
        "dependencies",
        "dev-dependencies",
        "dev_dependencies",
        "build-dependencies",
        "build_dependencies",
    ];
    fn table(value: Option<&toml::Value>) -> Option<&toml::Table> {
        value.and_then(toml::Value::as_table)
    }
    let mut tables = Vec::new();
    for kind in KINDS {
        if let Some(deps) = table(manifest.get(kind)) {
            tables.push((kind.to_owned(), deps));
        }
    }
    if let Some(targets) = table(manifest.get("target")) {
        for (target, tables_of_target) in targets {
            for kind in KINDS {
                if let Some(deps) = table(tables_of_target.get(kind)) {
                    tables.push((format!("target.{target}.{kind}"), deps));
                }
            }
        }
    }
    if let Some(deps) = table(manifest.get("workspace")).and_then(|w| table(w.get("dependencies")))
    {
        tables.push(("workspace.dependencies".to_owned(), deps));
    }
    if let Some(sources) = table(manifest.get("patch")) {
        for (source, patches) in sources {
            if let Some(patches) = patches.as_table() {
                tables.push((format!("patch.{source}"), patches));
            }
        }
    }
    if let Some(replace) = table(manifest.get("replace")) {
        tables.push(("replace".to_owned(), replace));
    }
    tables
}

/// Refuses what in the manifest would have cargo fetch from anywhere but the run's registry,
/// or read files outside the package: git and other registries' dependencies, and paths that
/// lead out of `package_dir`. `whose` names a patch's manifest in the log.
fn check_manifest(manifest: &toml::Table, package_dir: &Path, whose: &str, refused: &mut Refused) {
    for (section, deps) in dependency_tables(manifest) {
        for (name, dep) in deps {
            let Some(dep) = dep.as_table() else {
                continue;
            };
            if let Some(url) = dep.get("git") {
                let url = url.as_str().unwrap_or("?");
                refused.add(
                    Refusal::GitDependency,
                    format!("{whose}git dependency `{name}` from {url} ([{section}]): not fetched"),
                );
            }
            for key in ["registry", "registry-index"] {
                if let Some(registry) = dep.get(key) {
                    let registry = registry.as_str().unwrap_or("?");
                    refused.add(
                        Refusal::ForeignRegistry,
                        format!(
                            "{whose}dependency `{name}` from the registry {registry} \
                             ([{section}]): not fetched"
                        ),
                    );
                }
            }
            if let Some(path) = dep.get("path") {
                check_path(
                    path,
                    package_dir,
                    &format!("{whose}path dependency `{name}` ([{section}])"),
                    refused,
                );
            }
        }
    }
    let at = |table: &str, key: &str| {
        manifest
            .get(table)
            .and_then(toml::Value::as_table)
            .and_then(|t| t.get(key))
    };
    if let Some(workspace) = at("package", "workspace") {
        check_path(
            workspace,
            package_dir,
            &format!("{whose}package.workspace"),
            refused,
        );
    }
    for key in ["members", "default-members", "exclude"] {
        if let Some(toml::Value::Array(paths)) = at("workspace", key) {
            for path in paths {
                check_path(
                    path,
                    package_dir,
                    &format!("{whose}workspace.{key}"),
                    refused,
                );
            }
        }
    }
    match at("package", "build") {
        Some(toml::Value::Array(scripts)) => {
            for script in scripts {
                check_path(
                    script,
                    package_dir,
                    &format!("{whose}package.build"),
                    refused,
                );
            }
        }
        Some(script) => check_path(
            script,
            package_dir,
            &format!("{whose}package.build"),
            refused,
        ),
        None => {}
    }
    if let Some(path) = at("lib", "path") {
        check_path(path, package_dir, &format!("{whose}lib.path"), refused);
    }
    for kind in ["bin", "example", "test", "bench"] {
        let Some(toml::Value::Array(targets)) = manifest.get(kind) else {
            continue;
        };
        for target in targets {
            if let Some(path) = target.get("path") {
                check_path(
                    path,
                    package_dir,
                    &format!("{whose}[[{kind}]] path"),
                    refused,
                );
            }
        }
    }
}

/// Refuses `path` (a manifest's string, relative to `package_dir`) if it leads out of the
/// package. Judged by its text alone: the package has no links (unpacking refuses them), so
/// only `..` and absolute paths can leave it; a pattern (`workspace.members = ["crates/*"]`)
/// is judged the same way.
fn check_path(path: &toml::Value, package_dir: &Path, what: &str, refused: &mut Refused) {
    let Some(text) = path.as_str() else {
        return;
    };
    if leaves(Path::new(text)) {
        refused.add(
            Refusal::PathOutsidePackage,
            format!(
                "{what} is {text:?}, outside the package {}: not followed",
                package_dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            ),
        );
    }
}

/// Whether a relative path climbs out of its starting directory (or is not relative at all).
fn leaves(path: &Path) -> bool {
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return true,
            },
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

/// Marks the package as its own workspace root. Without this, cargo walks up from the scratch
/// directory and adopts any `Cargo.toml` workspace above it, failing the package for where it
/// was unpacked. Published manifests have no `[workspace]` (`cargo publish` strips it), so this
/// adds one and changes nothing else.
fn make_workspace_root(manifest: &Path, parsed: &toml::Table) -> Result<(), String> {
    if parsed.contains_key("workspace") {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(manifest)
        .map_err(|e| format!("cannot write Cargo.toml: {e}"))?;
    std::io::Write::write_all(&mut file, b"\n[workspace]\n")
        .map_err(|e| format!("cannot write Cargo.toml: {e}"))
}

/// Writes Quarry's configuration into a job's own cargo home: crates-io replaced by the
/// registry endpoint, reached through the SOCKS proxy at `proxy_socket` (the path as the step
/// that resolves sees it), no git through the command line, no colours. Nothing is shared with
/// other jobs: what cargo downloads lands there, in the job's scratch directory, and the steps
/// after resolution see it read-only.
pub fn write_cargo_home(cargo_home: &Path, proxy_socket: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(cargo_home)?;
    let proxy = toml::Value::String(format!("socks5h://localhost{}", proxy_socket.display()));
    let index = toml::Value::String(format!("sparse+http://{REGISTRY_HOST}/index/"));
    std::fs::write(
        cargo_home.join("config.toml"),
        format!(
            "[term]\ncolor = \"never\"\n\
             [net]\nretry = 3\ngit-fetch-with-cli = false\n\
             [http]\nproxy = {proxy}\n\
             [source.crates-io]\nreplace-with = \"quarry\"\n\
             [source.quarry]\nregistry = {index}\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn package_with(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("src/hostile-1.0.0");
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        (scratch, dir)
    }

    const PACKAGE: &str = "[package]\nname = \"hostile\"\nversion = \"1.0.0\"\n";

    #[test]
    fn override_files_are_removed_from_the_package_and_above_it() {
        let (scratch, dir) = package_with(&[
            ("Cargo.toml", PACKAGE),
            (
                ".cargo/config.toml",
                "[registry]\nglobal-credential-providers = [\"sh -c id\"]\n\
                 [source.crates-io]\nreplace-with = \"evil\"\n\
                 [target.x86_64-unknown-linux-gnu]\nrunner = \"sh\"\nrustflags = [\"-g\"]\n",
            ),
            (
                "rust-toolchain.toml",
                "[toolchain]\nchannel = \"nightly\"\n",
            ),
            ("../.cargo/config", "[alias]\nb = \"run\"\n"),
            ("../../rust-toolchain", "nightly"),
        ]);
        let mut refused = Refused::default();
        package(scratch.path(), &dir, &mut refused).unwrap();
        for gone in [
            ".cargo/config.toml",
            "rust-toolchain.toml",
            "../.cargo/config",
            "../../rust-toolchain",
        ] {
            assert!(!dir.join(gone).exists(), "{gone} is still there");
        }
        let log = refused.log_lines(0);
        assert!(
            log.contains(
                "refused (hostile-config): src/hostile-1.0.0/.cargo/config.toml set source, \
                 registry, target.x86_64-unknown-linux-gnu.runner"
            ),
            "{log}"
        );
        assert!(log.contains("src/.cargo/config set alias"), "{log}");
        assert_eq!(
            refused.refusals(),
            [Refusal::OverrideFile, Refusal::HostileConfig]
        );
        assert!(!refused.ends_the_job());
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.ends_with("\n[workspace]\n"), "{manifest}");
    }

    #[test]
    fn links_a_step_planted_are_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("config.toml"), "[alias]\n").unwrap();
        std::fs::write(outside.path().join("rust-toolchain"), "nightly").unwrap();
        let (scratch, dir) = package_with(&[("Cargo.toml", PACKAGE)]);
        // `.cargo` above the package, a link to a directory outside the scratch directory.
        std::os::unix::fs::symlink(outside.path(), scratch.path().join("src/.cargo")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("rust-toolchain"),
            dir.join("rust-toolchain"),
        )
        .unwrap();
        let mut refused = Refused::default();
        remove_override_files(scratch.path(), &dir, &mut refused);
        assert!(
            outside.path().join("config.toml").exists(),
            "followed a link"
        );
        assert!(
            outside.path().join("rust-toolchain").exists(),
            "followed a link"
        );
        assert!(!is_present(&scratch.path().join("src/.cargo")));
        assert!(!is_present(&dir.join("rust-toolchain")));
        assert!(!refused.ends_the_job(), "{}", refused.log_lines(0));

        // The package's own directory swapped for a link: nothing is touched, the job ends.
        let moved = scratch.path().join("moved");
        std::fs::rename(&dir, &moved).unwrap();
        std::os::unix::fs::symlink(outside.path(), &dir).unwrap();
        let mut refused = Refused::default();
        remove_override_files(scratch.path(), &dir, &mut refused);
        assert!(
            outside.path().join("config.toml").exists(),
            "followed a link"
        );
        assert!(refused.ends_the_job());
        assert!(
            refused
                .log_lines(0)
                .contains("src/hostile-1.0.0 is no longer a directory"),
            "{}",
            refused.log_lines(0)
        );
    }

    #[test]
    fn git_foreign_and_escaping_dependencies_are_refused() {
        let manifest = format!(
            "{PACKAGE}build = \"../../outside.rs\"\n\
             [dependencies]\nserde = \"1\"\nlocal = {{ path = \"crates/local\" }}\n\
             evil = {{ git = \"https://127.0.0.1:9/evil.git\" }}\n\
             [target.'cfg(unix)'.dev-dependencies]\nroot = {{ path = \"/\" }}\n\
             up = {{ path = \"crates/../../up\" }}\n\
             [build-dependencies]\nother = {{ version = \"1\", registry-index = \"sparse+http://127.0.0.1:9/\" }}\n\
             [patch.crates-io]\nserde = {{ git = \"https://127.0.0.1:9/serde.git\" }}\n"
        );
        let (scratch, dir) = package_with(&[("Cargo.toml", &manifest)]);
        let mut refused = Refused::default();
        package(scratch.path(), &dir, &mut refused).unwrap();
        let log = refused.log_lines(0);
        for expected in [
            "refused (git-dependency): git dependency `evil` from https://127.0.0.1:9/evil.git \
             ([dependencies]): not fetched",
            "refused (git-dependency): git dependency `serde` from https://127.0.0.1:9/serde.git \
             ([patch.crates-io]): not fetched",
            "refused (path-outside-package): path dependency `root` \
             ([target.cfg(unix).dev-dependencies]) is \"/\", outside the package",
            "path dependency `up` ([target.cfg(unix).dev-dependencies]) is \"crates/../../up\"",
            "refused (foreign-registry): dependency `other` from the registry \
             sparse+http://127.0.0.1:9/ ([build-dependencies]): not fetched",
            "package.build is \"../../outside.rs\"",
        ] {
            assert!(log.contains(expected), "{expected}\n{log}");
        }
        assert!(!log.contains("`local`"), "{log}");
        assert!(refused.ends_the_job());
    }

    #[test]
    fn a_plain_package_is_left_alone() {
        let (scratch, dir) = package_with(&[
            (
                "Cargo.toml",
                &format!("{PACKAGE}[dependencies]\nitoa = \"1\"\n"),
            ),
            ("src/lib.rs", ""),
        ]);
        let mut refused = Refused::default();
        package(scratch.path(), &dir, &mut refused).unwrap();
        assert_eq!(refused.len(), 0, "{}", refused.log_lines(0));
    }

    #[test]
    fn a_published_manifest_is_repaired_as_rustwide_does_and_the_log_says_how() {
        let manifest = format!(
            "cargo-features = [\"publish-lockfile\", \"default-run\"]\n{PACKAGE}\
             workspace = \"..\"\npublish-lockfile = true\ndefault-run = \"tool\"\n\
             [[bin]]\nname = \"hostile\"\n\
             [[bin]]\nname = \"tool\"\n\
             [[example]]\nname = \"demo\"\n\
             [[example]]\nname = \"kept\"\npath = \"examples/kept.rs\"\n\
             [[test]]\nname = \"integration\"\n\
             [[bench]]\nname = \"speed\"\npath = \"../speed.rs\"\n"
        );
        let (scratch, dir) = package_with(&[
            ("Cargo.toml", &manifest),
            ("src/main.rs", ""),
            ("examples/kept.rs", ""),
        ]);
        let mut refused = Refused::default();
        package(scratch.path(), &dir, &mut refused).unwrap();
        let log = refused.log_lines(0);
        for said in [
            "quarry: prepared: dropped [[bin]] `tool`: src/bin/tool.rs is not in the package",
            "quarry: prepared: dropped [[example]] `demo`: examples/demo.rs is not in the package",
            "quarry: prepared: dropped [[test]] `integration`: tests/integration.rs is not in the package",
            "quarry: prepared: removed package.workspace = \"..\": the package is its own workspace root",
            "quarry: prepared: removed the obsolete cargo feature `publish-lockfile`",
            "quarry: prepared: removed the obsolete package.publish-lockfile",
            "quarry: prepared: removed package.default-run = \"tool\"",
            // Not looked for outside the package: refused instead.
            "quarry: refused (path-outside-package): [[bench]] path is \"../speed.rs\"",
        ] {
            assert!(log.contains(said), "{said}\n---\n{log}");
        }
        let written = read_toml(&dir.join("Cargo.toml")).unwrap();
        let names = |kind: &str| -> Vec<&str> {
            written[kind]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap())
                .collect()
        };
        assert_eq!(names("bin"), ["hostile"]);
        assert_eq!(names("example"), ["kept"]);
        assert!(written["test"].as_array().unwrap().is_empty());
        assert!(written.contains_key("workspace"));
        assert!(written["package"].get("workspace").is_none());
        assert_eq!(written["cargo-features"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn a_shipped_lockfile_is_kept_if_it_is_one_and_removed_if_not() {
        let lock = "version = 4\n\n[[package]]\nname = \"hostile\"\nversion = \"1.0.0\"\n";
        let (scratch, dir) = package_with(&[
            ("Cargo.toml", PACKAGE),
            ("src/lib.rs", ""),
            ("Cargo.lock", lock),
        ]);
        let mut refused = Refused::default();
        package(scratch.path(), &dir, &mut refused).unwrap();
        assert!(dir.join("Cargo.lock").is_file());
        assert_eq!(refused.log_lines(0), "");
        assert!(refused.refusals().is_empty() && !refused.ends_the_job());

        for broken in ["[[package]\nname = ", "version = 99\n", "package = 3\n"] {
            let (scratch, dir) = package_with(&[
                ("Cargo.toml", PACKAGE),
                ("src/lib.rs", ""),
                ("Cargo.lock", broken),
            ]);
            let mut refused = Refused::default();
            package(scratch.path(), &dir, &mut refused).unwrap();
            assert!(!dir.join("Cargo.lock").exists(), "{broken:?}");
            let log = refused.log_lines(0);
            assert!(
                log.contains("Cargo.lock is not a valid lockfile")
                    && log.contains("cargo writes a new one"),
                "{log}"
            );
        }
    }

    #[test]
    fn paths_are_judged_by_whether_they_climb_out() {
        for inside in ["a", "a/../b", "./a/./b", "crates/*", "a/b/../.."] {
            assert!(!leaves(Path::new(inside)), "{inside}");
        }
        for outside in ["..", "/", "/etc", "a/../..", "../x", "a/../../x"] {
            assert!(leaves(Path::new(outside)), "{outside}");
        }
    }
}
