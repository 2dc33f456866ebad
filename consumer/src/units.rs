//! The pool of compiled units: what rustc made of a dependency in one slot, reused by every
//! slot of every consumer on the work directory instead of compiled again.
//!
//! A slot's kept target directory (`shared_target.rs`) saves a unit's compilation only for that
//! slot's later jobs; a popular dependency still compiled once per slot. The pool is one
//! directory beside the slots. `quarry-confine`, cargo's rustc wrapper, looks a unit up before
//! it runs rustc and, on a hit, copies the unit's outputs where cargo expects them and replays
//! what rustc said; on a miss it runs rustc confined as ever and adds what it made.
//!
//! What a unit is keyed by decides whether a copy is right. Cargo's own view (its fingerprints,
//! `-C metadata`) does not suffice: a unit's metadata records the exact hash (SVH) of every
//! crate it was compiled against, and a dependency whose build is not reproducible (a build
//! script that embeds the time, as `built` or `vergen` do) has another hash in each slot, so a
//! unit compiled in one slot would be refused next to another slot's copy of it (E0460). So the
//! key is made of what rustc reads, by content where it can differ between slots:
//!
//! - the rustc command line (every path in it is the same in every job: the sandbox shows the
//!   cargo home and the target directory at fixed places), its working directory, and its
//!   environment but for the few variables that name the job or the jobserver ([`UNKEYED_ENV`]);
//! - the unit's sources, by the checksum of their archive: only a unit whose crate root is in
//!   the store of sources (`sources.rs`, read-only, one entry per checksum) is pooled;
//! - the bytes of every crate it is given with `--extern`, of its build script's `OUT_DIR`, and
//!   of every directory in the target it is told to search for native libraries.
//!
//! After rustc, the dependency file it wrote must name no file outside the unit's sources and
//! `OUT_DIR`, and no environment variable the key leaves out; else the unit is not pooled.
//!
//! Who writes the pool: only this program's unconfined part, from the files a confined rustc
//! wrote into its own unit directory, the same invariant as the slot's target directory. A build
//! script or proc macro cannot write it (Landlock, `confine.rs`). Entries are whole directories
//! renamed into place, so a reader sees an entry complete or not at all; their files are made
//! read-only. Eviction ([`Pool::trim`], by the consumer after a job) removes the least recently
//! used entries; a unit whose entry goes mid-copy is compiled instead.

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

/// Where the sandbox shows the pool, writable for this program (rustc and build scripts run
/// confined away from it).
pub const SANDBOX_PATH: &str = "/run/quarry/units";

/// Set for cargo when a pool is shown at [`SANDBOX_PATH`]; removed before rustc runs.
pub const POOL_ENV: &str = "QUARRY_UNITS";

/// Environment variables left out of a unit's key: they name the job (its home, its package as
/// the working directory, the directory a
/// confined process may write) or the jobserver, not anything the unit is built from.
pub const UNKEYED_ENV: &[&str] = &[
    "HOME",
    "PWD",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    crate::confine::WRITABLE_ENV,
    POOL_ENV,
];

/// In each unit's entry: the outputs' file names, one per line; written last.
const OUTPUTS: &str = "outputs";
/// In each build script run's entry: written last, empty.
const RAN: &str = "ran";
/// In each build script run's entry: its `OUT_DIR` as the run left it.
const RUN_OUT: &str = "out";
/// In each build script run's entry: what it printed (cargo reads its instructions there).
const STDOUT: &str = "stdout";
/// In each entry: what rustc wrote to its standard error, as forwarded to cargo.
const STDERR: &str = "stderr";
/// Entries being written or removed, and the locks of those being made.
const PARTIAL: &str = ".partial-";
pub(crate) const MAKING: &str = ".making-";
const REMOVED: &str = ".removed-";
/// What rustc may say of a unit for it to be pooled.
const STDERR_LIMIT: usize = 1 << 20;
/// In a slot's target directory: one line per unit this job reused or added, for the
/// consumer's count.
pub const JOURNAL: &str = ".quarry-units";

/// What a unit is looked up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key being made: each field length-prefixed, so that no two different sequences of fields
/// hash alike.
struct KeyHasher(sha2::Sha256);

impl KeyHasher {
    /// A key of `kind` (what is keyed, and the version of how).
    fn new(kind: &[u8]) -> KeyHasher {
        let mut key = KeyHasher(sha2::Sha256::new());
        key.field(kind);
        key
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Keys `env` but for [`UNKEYED_ENV`], in name order; returns the keyed values, in that order.
    fn env<'a>(&mut self, env: &'a [(OsString, OsString)]) -> Vec<&'a OsString> {
        let mut keyed: Vec<&(OsString, OsString)> = env
            .iter()
            .filter(|(name, _)| !UNKEYED_ENV.iter().any(|u| name == *u))
            .collect();
        keyed.sort();
        for (name, value) in &keyed {
            self.field(name.as_bytes());
            self.field(value.as_bytes());
        }
        keyed.into_iter().map(|(_, value)| value).collect()
    }

    fn finish(self) -> Key {
        Key(hex::encode(self.0.finalize()))
    }
}

/// A unit that may be pooled: its key, and the places its inputs may come from.
#[derive(Debug)]
pub struct Poolable {
    pub key: Key,
    /// Its sources: the store's entry (`<sources>/<checksum>/<name>-<version>`).
    pub sources: PathBuf,
    /// Its build script's `OUT_DIR`, if it has one.
    pub out_dir: Option<PathBuf>,
}

impl Poolable {
    /// rustc `rustc` run with `args` (expanded) in `cwd`, with `env`, where the store of
    /// sources is `sources` and the target directory `target`; `None` when the unit is not one
    /// to pool (its crate root is not in the store, or an input cannot be read as data).
    pub fn of(
        rustc: &OsStr,
        args: &[OsString],
        cwd: &Path,
        env: &[(OsString, OsString)],
        sources: &Path,
        target: &Path,
    ) -> Option<Poolable> {
        let mut key = KeyHasher::new(b"quarry-unit 1");
        let mut field = |bytes: &[u8]| key.field(bytes);
        field(rustc.as_bytes());
        // Cargo runs rustc in the job's package (the workspace root) and names a dependency's
        // crate root by its absolute path: the working directory counts only where the command
        // line is relative to it.
        let root = crate_root(args)?;
        if root.is_relative() {
            field(cwd.as_os_str().as_bytes());
        }
        // The crate root: in the store, so its sources are its archive's, by checksum.
        let root = std::fs::canonicalize(cwd.join(root)).ok()?;
        let entry = store_entry(&root, sources)?;
        field(entry.as_os_str().as_bytes());
        for arg in args {
            field(arg.as_bytes());
        }
        key.env(env);
        let mut field = |bytes: &[u8]| key.field(bytes);
        let text: Vec<&str> = args.iter().map(|a| a.to_str().unwrap_or("")).collect();
        for (i, arg) in text.iter().enumerate() {
            let value = |flag: &str| {
                if *arg == flag {
                    text.get(i + 1).copied()
                } else {
                    arg.strip_prefix(flag).and_then(|v| v.strip_prefix('='))
                }
            };
            if let Some(spec) = value("--extern") {
                // `name=path` (a path-less `--extern name` is a sysroot crate).
                if let Some((_, path)) = spec.split_once('=') {
                    field(&file_digest(Path::new(path))?);
                }
            }
            if let Some(spec) = value("-L") {
                // The target's directories of native libraries are build scripts' outputs: by
                // content. The crates' directory is searched only for crates, given by
                // `--extern` or named by the hash their dependents record.
                let dir = Path::new(spec.split_once('=').map_or(spec, |(_, dir)| dir));
                if dir.starts_with(target) && !spec.starts_with("dependency=") {
                    field(&tree_digest(dir)?);
                }
            }
        }
        let out_dir = env_value(env, "OUT_DIR").map(|(_, dir)| PathBuf::from(dir));
        if let Some(dir) = &out_dir {
            field(&tree_digest(dir)?);
        }
        Some(Poolable {
            key: key.finish(),
            sources: entry,
            out_dir,
        })
    }
}

fn env_value<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a (OsString, OsString)> {
    env.iter().find(|(n, _)| n == name)
}

/// A build script run that may be pooled: its key, and the `OUT_DIR` it writes.
#[derive(Debug)]
pub struct PoolableRun {
    pub key: Key,
    pub out_dir: PathBuf,
}

impl PoolableRun {
    /// The build script `program` (the compiled script itself) run with `args` in `cwd`, with
    /// `env`; `None` unless `cwd` is a package of the store of sources. Keyed by the script's
    /// bytes, its command line, its package (the archive's checksum), its environment but for
    /// [`UNKEYED_ENV`], and the bytes of every build script output in the target that its
    /// environment names: its own `OUT_DIR` as cargo left it, a dependency's `DEP_*` paths.
    /// What a build script reads of the machine (a C compiler, `pkg-config`) is the machine's,
    /// the same for every job of the pool.
    pub fn of(
        program: &Path,
        args: &[OsString],
        cwd: &Path,
        env: &[(OsString, OsString)],
        sources: &Path,
        target: &Path,
    ) -> Option<PoolableRun> {
        let mut key = KeyHasher::new(b"quarry-run 1");
        key.field(&file_digest(program)?);
        for arg in args {
            key.field(arg.as_bytes());
        }
        let package = std::fs::canonicalize(cwd).ok()?;
        let entry = store_entry(&package, sources)?;
        if entry != package {
            return None;
        }
        key.field(entry.as_os_str().as_bytes());
        for value in key.env(env) {
            for path in std::env::split_paths(value) {
                if is_build_output(&path, target) {
                    match path.symlink_metadata() {
                        Ok(meta) if meta.is_dir() => key.field(&tree_digest(&path)?),
                        Ok(meta) if meta.is_file() => key.field(&file_digest(&path)?),
                        Ok(_) => return None,
                        Err(_) => key.field(b"absent"),
                    }
                }
            }
        }
        let out_dir = PathBuf::from(env_value(env, "OUT_DIR")?.1.clone());
        Some(PoolableRun {
            key: key.finish(),
            out_dir,
        })
    }
}

/// Whether `path` is in a build script's output in `target` (`<target>/[<triple>/]<profile>/build/`).
fn is_build_output(path: &Path, target: &Path) -> bool {
    path.strip_prefix(target).is_ok_and(|rest| {
        rest.components()
            .take(3)
            .any(|part| part == Component::Normal(OsStr::new("build")))
    })
}

/// The crate root rustc is given: the one argument that is a `.rs` file and no flag's value.
fn crate_root(args: &[OsString]) -> Option<&Path> {
    let mut roots = args.iter().enumerate().filter(|(i, arg)| {
        let text = arg.to_str().unwrap_or("");
        let after_flag = i
            .checked_sub(1)
            .and_then(|p| args[p].to_str())
            .is_some_and(|prev| prev.starts_with('-') && !prev.contains('='));
        text.ends_with(".rs") && !text.starts_with('-') && !after_flag
    });
    let (_, root) = roots.next()?;
    roots.next().is_none().then(|| Path::new(root))
}

/// The store entry (`<sources>/<checksum>/<name>-<version>`) that `file` is in.
fn store_entry(file: &Path, sources: &Path) -> Option<PathBuf> {
    let rest = file.strip_prefix(sources).ok()?;
    let mut parts = rest.components();
    let (Some(Component::Normal(checksum)), Some(Component::Normal(package))) =
        (parts.next(), parts.next())
    else {
        return None;
    };
    Some(sources.join(checksum).join(package))
}

/// The sha256 of a regular file's bytes.
fn file_digest(path: &Path) -> Option<Vec<u8>> {
    let meta = path.symlink_metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut hash = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hash).ok()?;
    Some(hash.finalize().to_vec())
}

/// The sha256 of a directory's tree: names, kinds and bytes, in name order; `None` if it holds
/// anything but directories and regular files. A directory that does not exist digests as
/// empty (cargo names `OUT_DIR`s that a build script may leave unmade).
fn tree_digest(root: &Path) -> Option<Vec<u8>> {
    let mut hash = sha2::Sha256::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&relative)) else {
            if relative.as_os_str().is_empty() && !root.exists() {
                break;
            }
            return None;
        };
        let mut entries: Vec<_> = entries.collect::<Result<_, _>>().ok()?;
        entries.sort_by_key(|e| e.file_name());
        let mut directories = Vec::new();
        for entry in entries {
            let name = relative.join(entry.file_name());
            let kind = entry.file_type().ok()?;
            hash.update((name.as_os_str().len() as u64).to_le_bytes());
            hash.update(name.as_os_str().as_bytes());
            if kind.is_dir() {
                hash.update(b"d");
                directories.push(name);
            } else if kind.is_file() {
                hash.update(b"f");
                hash.update(file_digest(&root.join(&name))?);
            } else {
                return None;
            }
        }
        // Depth first, in name order.
        pending.extend(directories.into_iter().rev());
    }
    Some(hash.finalize().to_vec())
}

/// Whether rustc's dependency file `dep_info` names only files of the unit's sources (`entry`,
/// the store's) and of its `OUT_DIR`, and no environment variable the key leaves out: then the
/// key held everything the unit read.
pub fn read_only_keyed_inputs(dep_info: &Path, entry: &Path, out_dir: Option<&Path>) -> bool {
    let Ok(text) = std::fs::read_to_string(dep_info) else {
        return false;
    };
    for line in text.lines() {
        if let Some(env) = line.strip_prefix("# env-dep:") {
            let name = env.split_once('=').map_or(env, |(name, _)| name);
            if UNKEYED_ENV.contains(&name) {
                return false;
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // `outputs: inputs`, then `input:` for each input again; the inputs are what count.
        let Some((_, inputs)) = line.split_once(": ") else {
            continue;
        };
        let out_dir = out_dir.and_then(|dir| std::fs::canonicalize(dir).ok());
        // Paths with spaces are escaped (`\ `); none of Quarry's fixed places have any, so
        // such a path is one to refuse anyway.
        for path in inputs.split(' ').filter(|p| !p.is_empty()) {
            let Ok(path) = std::fs::canonicalize(path) else {
                return false;
            };
            let inside = path.starts_with(entry)
                || out_dir.as_ref().is_some_and(|dir| path.starts_with(dir));
            if !inside {
                return false;
            }
        }
    }
    true
}

/// The pool: what `quarry-confine` reads and adds to inside the sandbox, what the consumer
/// trims outside.
#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
    /// What [`Pool::trim`] keeps it within.
    limit_bytes: u64,
    /// The pool's size as this process last measured it, and when, plus what this process's
    /// jobs added since: [`Pool::after_adding`] walks the pool only when that passes the limit
    /// or the measure is [`REMEASURE`] old.
    estimate: std::sync::Arc<std::sync::Mutex<Estimate>>,
}

#[derive(Debug, Default)]
struct Estimate {
    bytes: u64,
    measured: Option<std::time::Instant>,
}

/// How long a measure of the pool stands before it is walked again though this process's
/// additions keep it below its limit: other consumers on the work directory add to it too, and
/// that is the longest their additions go uncounted.
pub const REMEASURE: std::time::Duration = std::time::Duration::from_secs(600);

/// Held while a unit is compiled or a build script run for the pool (an exclusive `flock` on
/// `.making-<key>`), or a dependency extracted into the store of sources (`sources.rs`): another
/// slot or consumer that wants the same waits for it, then takes what it made, instead of doing
/// the same work at once. The kernel releases the lock however the process
/// ends. Locks are taken one at a time (a build script's run may start a rustc, whose unit
/// lock is the only one it takes), so none waits on another in a cycle.
pub struct Making {
    path: PathBuf,
    _file: std::fs::File,
}

impl Making {
    /// Waits until no other holder of the lock file `path` has it, and holds it; `None` where
    /// the lock cannot be had (then the caller makes it without: at worst, twice).
    pub fn take(path: PathBuf) -> Option<Making> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        file.lock().ok()?;
        Some(Making { path, _file: file })
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        // Before the lock goes: one who waited on it takes the entry; one who comes after makes
        // a lock anew and finds the entry.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A build script run's entry found for a key.
pub struct RunHit {
    /// What it printed, to be printed again.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// An entry found for a key.
pub struct Hit {
    /// The outputs' file names.
    pub outputs: Vec<OsString>,
    /// What rustc said, to be said again.
    pub stderr: Vec<u8>,
}

impl Pool {
    /// The pool in `dir`, kept within `limit_bytes` by [`Pool::trim`].
    pub fn new(dir: impl Into<PathBuf>, limit_bytes: u64) -> Pool {
        Pool {
            dir: dir.into(),
            limit_bytes,
            estimate: Default::default(),
        }
    }

    /// The pool as `quarry-confine` sees it (it never trims).
    pub fn at(dir: impl Into<PathBuf>) -> Pool {
        Pool::new(dir, u64::MAX)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies the entry of `key`, if there is one, into `out_dir` (each output replacing what
    /// is there); `None` if there is none or it could not all be copied (what was copied is
    /// removed: rustc then makes the unit).
    pub fn adopt(
        &self,
        key: &Key,
        out_dir: &Path,
        is_output: impl Fn(&OsStr) -> bool,
    ) -> Option<Hit> {
        let entry = self.dir.join(key.as_str());
        let listed = std::fs::read(entry.join(OUTPUTS)).ok()?;
        let outputs: Vec<OsString> = listed
            .split(|b| *b == b'\n')
            .filter(|name| !name.is_empty())
            .map(|name| OsStr::from_bytes(name).to_owned())
            .collect();
        // Names the wrapper wrote; checked all the same, as any path read back.
        if outputs.iter().any(|name| {
            Path::new(name).components().count() != 1
                || !matches!(
                    Path::new(name).components().next(),
                    Some(Component::Normal(_))
                )
                || !is_output(name)
        }) {
            return None;
        }
        let stderr = std::fs::read(entry.join(STDERR)).ok()?;
        let mut copied = Vec::new();
        for name in &outputs {
            let to = out_dir.join(name);
            let _ = std::fs::remove_file(&to);
            if copy_plain(&entry.join(name), &to).is_err() {
                for name in copied {
                    let _ = std::fs::remove_file(out_dir.join(name));
                }
                let _ = std::fs::remove_file(&to);
                return None;
            }
            // rustc writes outputs writable; cargo may replace them later.
            let _ = std::fs::set_permissions(&to, writable(&to));
            copied.push(name.clone());
        }
        used_now(&entry.join(OUTPUTS));
        Some(Hit { outputs, stderr })
    }

    /// Adds the unit `key` whose `outputs` rustc just wrote into `out_dir`, having said
    /// `stderr`. Losing a race to another slot adding the same unit is no error.
    pub fn add(
        &self,
        key: &Key,
        out_dir: &Path,
        outputs: &[OsString],
        stderr: &[u8],
    ) -> std::io::Result<u64> {
        if stderr.len() > STDERR_LIMIT || outputs.is_empty() {
            return Ok(0);
        }
        self.put(key, OUTPUTS, |partial| {
            for name in outputs {
                let to = partial.join(name);
                copy_plain(&out_dir.join(name), &to)?;
                std::fs::set_permissions(&to, read_only(&to))?;
            }
            std::fs::write(partial.join(STDERR), stderr)?;
            let mut listed = Vec::new();
            for name in outputs {
                listed.extend_from_slice(name.as_bytes());
                listed.push(b'\n');
            }
            std::fs::write(partial.join(OUTPUTS), listed)
        })
    }

    /// Writes the entry of `key` with `write` into a directory of its own, then renames it into
    /// place whole; `marker` is the file `write` writes last. An entry that is there already
    /// (another slot's) is kept, and that is no error. Returns the bytes it added.
    fn put(
        &self,
        key: &Key,
        marker: &str,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        let entry = self.dir.join(key.as_str());
        if entry.exists() {
            return Ok(0);
        }
        let partial = self
            .dir
            .join(format!("{PARTIAL}{}-{}", key.as_str(), std::process::id()));
        let written = std::fs::create_dir_all(&partial)
            .and_then(|()| write(&partial))
            .map(|()| crate::shared_target::disk_used(&partial))
            .and_then(|bytes| std::fs::rename(&partial, &entry).map(|()| bytes));
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
            if entry.join(marker).exists() {
                return Ok(0);
            }
        }
        written
    }

    /// Waits until no other process is making `key`, and holds it; `None` where the lock
    /// cannot be had (then the caller makes it without: at worst, twice).
    pub fn make(&self, key: &Key) -> Option<Making> {
        Making::take(self.dir.join(format!("{MAKING}{}", key.as_str())))
    }

    /// Fills `out_dir` from the entry of the build script run `key`, if there is one (each file
    /// replacing what is there); `None` if there is none or it could not all be copied (the
    /// script then runs: it writes its `OUT_DIR` again).
    pub fn adopt_run(&self, key: &Key, out_dir: &Path) -> Option<RunHit> {
        let entry = self.dir.join(key.as_str());
        let ran = entry.join(RAN);
        ran.symlink_metadata().ok()?;
        let stdout = std::fs::read(entry.join(STDOUT)).ok()?;
        let stderr = std::fs::read(entry.join(STDERR)).ok()?;
        copy_tree(&entry.join(RUN_OUT), out_dir, false).ok()?;
        used_now(&ran);
        Some(RunHit { stdout, stderr })
    }

    /// Adds the build script run `key` that left `out_dir` as it is and printed `stdout` and
    /// `stderr`. Not added if the script left anything in `out_dir` but directories and
    /// regular files.
    pub fn add_run(
        &self,
        key: &Key,
        out_dir: &Path,
        stdout: &[u8],
        stderr: &[u8],
    ) -> std::io::Result<u64> {
        self.put(key, RAN, |partial| {
            copy_tree(out_dir, &partial.join(RUN_OUT), true)?;
            std::fs::write(partial.join(STDOUT), stdout)?;
            std::fs::write(partial.join(STDERR), stderr)?;
            std::fs::write(partial.join(RAN), b"")
        })
    }

    /// After a job whose units added `added_bytes` to the pool: trims it ([`Pool::trim`], a
    /// walk of all of it) if it may be past its limit by now, or if the last measure is
    /// [`REMEASURE`] old; else counts the bytes on. Returns the pool's size as measured or
    /// estimated, and the entries removed.
    pub fn after_adding(&self, added_bytes: u64) -> (u64, usize) {
        {
            let mut estimate = self.estimate.lock().unwrap_or_else(|p| p.into_inner());
            estimate.bytes = estimate.bytes.saturating_add(added_bytes);
            let recent = estimate.measured.is_some_and(|at| at.elapsed() < REMEASURE);
            if recent && estimate.bytes <= self.limit_bytes {
                return (estimate.bytes, 0);
            }
            // Another slot that finishes meanwhile counts on instead of walking too.
            estimate.measured = Some(std::time::Instant::now());
        }
        let (bytes, removed) = self.trim();
        let mut estimate = self.estimate.lock().unwrap_or_else(|p| p.into_inner());
        *estimate = Estimate {
            bytes,
            measured: Some(std::time::Instant::now()),
        };
        (bytes, removed)
    }

    /// The pool's size on disk, and past its limit removes the least recently used
    /// entries until it is at most nine tenths of it. Returns the size after, and how many
    /// entries went. Consumers sharing the pool may trim at once: an entry is renamed aside
    /// before it is removed, and a rename that fails means another took it.
    pub fn trim(&self) -> (u64, usize) {
        let limit_bytes = self.limit_bytes;
        use std::os::unix::fs::MetadataExt as _;
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        let mut sized = Vec::new();
        let mut total = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let path = entry.path();
            if name.as_bytes().starts_with(REMOVED.as_bytes()) {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            // What a process killed mid-way left (a job past its time limit): no entry or lock
            // is in hand that long.
            let stale = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .is_some_and(|at| {
                    at.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600)
                });
            if stale
                && (name.as_bytes().starts_with(PARTIAL.as_bytes())
                    || name.as_bytes().starts_with(MAKING.as_bytes()))
            {
                let _ = std::fs::remove_dir_all(&path);
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let bytes = crate::shared_target::disk_used(&path);
            total += bytes;
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            // Touched on every hit: a unit's list of outputs, a run's marker.
            let used = [OUTPUTS, RAN]
                .iter()
                .filter_map(|marker| path.join(marker).symlink_metadata().ok())
                .map(|meta| meta.mtime())
                .max()
                .unwrap_or(0);
            sized.push((used, bytes, path));
        }
        let mut removed = 0;
        if total > limit_bytes {
            sized.sort();
            let goal = limit_bytes / 10 * 9;
            for (_, bytes, path) in sized {
                if total <= goal {
                    break;
                }
                let aside = self
                    .dir
                    .join(format!("{REMOVED}{}", uuid::Uuid::new_v4().simple()));
                if std::fs::rename(&path, &aside).is_ok() {
                    let _ = std::fs::remove_dir_all(&aside);
                    total = total.saturating_sub(bytes);
                    removed += 1;
                }
            }
        }
        (total, removed)
    }
}

/// Marks an entry recently used (its `marker`'s modification time, which trimming reads): it is
/// trimmed last.
fn used_now(marker: &Path) {
    if let Ok(file) = std::fs::File::open(marker) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Copies a regular file (a link or anything else is refused), its permissions with it.
fn copy_plain(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.symlink_metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    std::fs::copy(from, to).map(|_| ())
}

/// Copies the tree `from` into `to` (created): directories and regular files only, anything
/// else an error. Files are made read-only if `read_only` (into the pool), writable if not
/// (out of it).
fn copy_tree(from: &Path, to: &Path, read_only_files: bool) -> std::io::Result<()> {
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let into = to.join(&relative);
        std::fs::create_dir_all(&into)?;
        for entry in std::fs::read_dir(from.join(&relative))? {
            let entry = entry?;
            let name = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(name);
            } else if kind.is_file() {
                let target = to.join(&name);
                if !read_only_files {
                    let _ = std::fs::remove_file(&target);
                }
                copy_plain(&from.join(&name), &target)?;
                let mode = if read_only_files {
                    read_only(&target)
                } else {
                    writable(&target)
                };
                std::fs::set_permissions(&target, mode)?;
            } else {
                return Err(std::io::Error::other(format!(
                    "{} is neither a directory nor a regular file",
                    name.display()
                )));
            }
        }
    }
    Ok(())
}

fn read_only(path: &Path) -> std::fs::Permissions {
    let mode = path.metadata().map_or(0o444, |m| m.permissions().mode());
    std::fs::Permissions::from_mode(mode & 0o555)
}

fn writable(path: &Path) -> std::fs::Permissions {
    let mode = path.metadata().map_or(0o644, |m| m.permissions().mode());
    std::fs::Permissions::from_mode(mode | 0o200)
}

/// How a unit went, for the job's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Copied from the pool: rustc did not run.
    Reused,
    /// Compiled and added.
    Added,
    /// A build script's output copied from the pool: the script did not run.
    RunReused,
    /// A build script run and its output added.
    RunAdded,
}

/// Appends `how` for `crate_name` to the slot's journal (`<target>/` [`JOURNAL`]).
pub fn note(target: &Path, how: Use, crate_name: &str, bytes: u64) {
    let word = match how {
        Use::Reused => "reused",
        Use::Added => "added",
        Use::RunReused => "run-reused",
        Use::RunAdded => "run-added",
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target.join(JOURNAL))
    {
        let _ = file.write_all(format!("{word} {crate_name} {bytes}\n").as_bytes());
    }
}

/// What a job's units came to, read (and removed) from the slot's journal after the job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub reused: u64,
    pub added: u64,
    /// Build script runs.
    pub runs_reused: u64,
    pub runs_added: u64,
    /// What the units and runs added take in the pool.
    pub added_bytes: u64,
}

/// Reads and removes the journal in `target` (a slot's target directory on the host). Read as
/// data: a plain file, at most 4 MiB of it.
pub fn take_counts(target: &Path) -> Counts {
    use std::io::Read as _;
    let path = target.join(JOURNAL);
    let mut counts = Counts::default();
    let Ok(meta) = path.symlink_metadata() else {
        return counts;
    };
    if meta.is_file()
        && let Ok(file) = std::fs::File::open(&path)
    {
        let mut text = Vec::new();
        let _ = file.take(4 << 20).read_to_end(&mut text);
        for line in text.split(|b| *b == b'\n') {
            // `<use> <crate> <bytes>`: the bytes are the last word.
            let bytes = || {
                line.rsplit(|b| *b == b' ')
                    .next()
                    .and_then(|word| std::str::from_utf8(word).ok()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if line.starts_with(b"reused ") {
                counts.reused += 1;
            } else if line.starts_with(b"added ") {
                counts.added += 1;
                counts.added_bytes = counts.added_bytes.saturating_add(bytes());
            } else if line.starts_with(b"run-reused ") {
                counts.runs_reused += 1;
            } else if line.starts_with(b"run-added ") {
                counts.runs_added += 1;
                counts.added_bytes = counts.added_bytes.saturating_add(bytes());
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of sources holding one package, and a target directory holding a crate it is
    /// built against.
    struct Place {
        _dir: tempfile::TempDir,
        sources: PathBuf,
        target: PathBuf,
        root: PathBuf,
    }

    fn place() -> Place {
        let dir = tempfile::tempdir().unwrap();
        let sources = dir.path().join("sources");
        let package = sources.join("ab12/foo-1.0.0");
        std::fs::create_dir_all(package.join("src")).unwrap();
        std::fs::write(package.join("src/lib.rs"), "pub fn f() {}").unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir_all(target.join("debug/deps")).unwrap();
        std::fs::create_dir_all(target.join("debug/build/foo-1/out")).unwrap();
        std::fs::write(target.join("debug/deps/libbar-1.rmeta"), b"bar, one build").unwrap();
        Place {
            root: package.join("src/lib.rs"),
            sources,
            target,
            _dir: dir,
        }
    }

    fn args(place: &Place) -> Vec<OsString> {
        [
            "--crate-name",
            "foo",
            place.root.to_str().unwrap(),
            "--extern",
            &format!(
                "bar={}",
                place.target.join("debug/deps/libbar-1.rmeta").display()
            ),
            "-L",
            &format!("dependency={}", place.target.join("debug/deps").display()),
        ]
        .map(OsString::from)
        .to_vec()
    }

    fn key(place: &Place, env: &[(&str, &str)]) -> Option<Key> {
        let env: Vec<(OsString, OsString)> = env
            .iter()
            .map(|(n, v)| (OsString::from(n), OsString::from(v)))
            .collect();
        Poolable::of(
            OsStr::new("rustc"),
            &args(place),
            Path::new("/job"),
            &env,
            &place.sources,
            &place.target,
        )
        .map(|unit| unit.key)
    }

    #[test]
    fn a_units_key_follows_the_bytes_of_what_it_is_built_against() {
        let place = place();
        let out_dir = place.target.join("debug/build/foo-1/out");
        let env = [("HOME", "/job-1"), ("OUT_DIR", out_dir.to_str().unwrap())];
        let first = key(&place, &env).expect("a unit from the store is pooled");
        // Another job's home is no difference.
        let env_elsewhere = [("HOME", "/job-2"), ("OUT_DIR", out_dir.to_str().unwrap())];
        assert_eq!(key(&place, &env_elsewhere).as_ref(), Some(&first));
        // Another build of a crate it is given is.
        std::fs::write(
            place.target.join("debug/deps/libbar-1.rmeta"),
            b"bar, another",
        )
        .unwrap();
        let rebuilt = key(&place, &env).unwrap();
        assert_ne!(rebuilt, first);
        // So is what its build script wrote, and a variable it may read.
        std::fs::write(out_dir.join("stamp.rs"), b"1").unwrap();
        assert_ne!(key(&place, &env).unwrap(), rebuilt);
        let featured = [("CARGO_FEATURE_STD", "1"), env[0], env[1]];
        assert_ne!(key(&place, &featured).unwrap(), key(&place, &env).unwrap());
        // A link in OUT_DIR is not data to key by: not pooled.
        std::os::unix::fs::symlink("/etc/passwd", out_dir.join("link")).unwrap();
        assert_eq!(key(&place, &env), None);
    }

    #[test]
    fn only_a_unit_from_the_store_of_sources_is_pooled() {
        let place = place();
        let own = place.target.join("lib.rs");
        std::fs::write(&own, "").unwrap();
        let mut args = args(&place);
        args[2] = own.into_os_string();
        let pooled = Poolable::of(
            OsStr::new("rustc"),
            &args,
            Path::new("/job"),
            &[],
            &place.sources,
            &place.target,
        );
        assert!(pooled.is_none());
    }

    #[test]
    fn a_unit_that_read_a_file_outside_its_sources_is_not_pooled() {
        let place = place();
        let entry = place.sources.join("ab12/foo-1.0.0");
        let dep_info = place.target.join("foo-1.d");
        let write = |inputs: &str| {
            std::fs::write(
                &dep_info,
                format!(
                    "/t/libfoo-1.rmeta: {inputs}\n\n{inputs}:\n\n# env-dep:CARGO_PKG_NAME=foo\n"
                ),
            )
            .unwrap();
        };
        write(place.root.to_str().unwrap());
        assert!(read_only_keyed_inputs(&dep_info, &entry, None));
        write("/etc/hostname");
        assert!(!read_only_keyed_inputs(&dep_info, &entry, None));
        std::fs::write(&dep_info, "# env-dep:HOME\n").unwrap();
        assert!(!read_only_keyed_inputs(&dep_info, &entry, None));
    }

    #[test]
    fn an_entry_is_taken_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(dir.path().join("pool"), 1 << 20);
        std::fs::create_dir_all(pool.dir()).unwrap();
        let built = dir.path().join("built");
        std::fs::create_dir(&built).unwrap();
        std::fs::write(built.join("libfoo-1.rmeta"), b"meta").unwrap();
        std::fs::write(built.join("foo-1.d"), b"deps").unwrap();
        let outputs = [OsString::from("libfoo-1.rmeta"), OsString::from("foo-1.d")];
        let key = Key("k1".to_owned());
        pool.add(&key, &built, &outputs, b"said\n").unwrap();
        let is_output = |name: &OsStr| name.to_string_lossy().contains("-1");

        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let hit = pool.adopt(&key, &elsewhere, is_output).unwrap();
        assert_eq!(hit.stderr, b"said\n");
        assert_eq!(
            std::fs::read(elsewhere.join("libfoo-1.rmeta")).unwrap(),
            b"meta"
        );
        assert!(
            pool.adopt(&Key("k2".to_owned()), &elsewhere, is_output)
                .is_none()
        );

        // An entry missing a file (removed as it was read) leaves nothing behind.
        let partly = dir.path().join("partly");
        std::fs::create_dir(&partly).unwrap();
        let mut mode = std::fs::metadata(pool.dir().join("k1"))
            .unwrap()
            .permissions();
        mode.set_mode(0o755);
        std::fs::set_permissions(pool.dir().join("k1"), mode).unwrap();
        std::fs::remove_file(pool.dir().join("k1/foo-1.d")).unwrap();
        assert!(pool.adopt(&key, &partly, is_output).is_none());
        assert_eq!(std::fs::read_dir(&partly).unwrap().count(), 0);

        // An entry naming another unit's file is not taken.
        assert!(pool.adopt(&key, &partly, |_| false).is_none());
    }

    #[test]
    fn one_makes_a_unit_while_another_waits_and_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(dir.path().join("pool"), 1 << 30);
        std::fs::create_dir_all(pool.dir()).unwrap();
        let key = Key("k".to_owned());
        let making = pool.make(&key).unwrap();
        let waiter = {
            let (pool, key) = (pool.clone(), key.clone());
            std::thread::spawn(move || {
                let _turn = pool.make(&key).unwrap();
                // Its turn comes only once the maker is done: the entry is there.
                pool.dir().join(key.as_str()).join(OUTPUTS).exists()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let built = dir.path().join("built");
        std::fs::create_dir(&built).unwrap();
        std::fs::write(built.join("libk.rmeta"), b"meta").unwrap();
        pool.add(&key, &built, &[OsString::from("libk.rmeta")], b"")
            .unwrap();
        drop(making);
        assert!(
            waiter.join().unwrap(),
            "the waiter took its turn before the entry was made"
        );
        assert!(
            !pool.dir().join(".making-k").exists(),
            "no lock is left behind"
        );
    }

    #[test]
    fn past_its_limit_the_least_recently_used_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(dir.path().join("pool"), 96 << 10);
        std::fs::create_dir_all(pool.dir()).unwrap();
        let built = dir.path().join("built");
        std::fs::create_dir(&built).unwrap();
        std::fs::write(built.join("big"), vec![7u8; 40 << 10]).unwrap();
        let outputs = [OsString::from("big")];
        for (key, age) in [("old", 300), ("used", 200), ("new", 100)] {
            pool.add(&Key(key.to_owned()), &built, &outputs, b"")
                .unwrap();
            let listed = std::fs::File::open(pool.dir().join(key).join(OUTPUTS)).unwrap();
            listed
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
        }
        // Taking an entry makes it the most recently used.
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        pool.adopt(&Key("old".to_owned()), &out, |_| true).unwrap();
        let (after, removed) = pool.trim();
        assert!(removed >= 1 && after <= 96 << 10, "{after} {removed}");
        assert!(pool.dir().join("old").exists());
        assert!(!pool.dir().join("used").exists());
    }

    #[test]
    fn the_pool_is_walked_only_when_what_was_added_may_take_it_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 128 << 10;
        let pool = Pool::new(dir.path().join("pool"), limit);
        std::fs::create_dir_all(pool.dir()).unwrap();
        let built = dir.path().join("built");
        std::fs::create_dir(&built).unwrap();
        std::fs::write(built.join("big"), vec![7u8; 40 << 10]).unwrap();
        let outputs = [OsString::from("big")];
        // A job adds an entry and journals its bytes, as quarry-confine does; then the consumer.
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let add = |key: &str| {
            let bytes = pool
                .add(&Key(key.to_owned()), &built, &outputs, b"")
                .unwrap();
            assert!(bytes >= 40 << 10, "{bytes}");
            note(&target, Use::Added, key, bytes);
            let counts = take_counts(&target);
            assert_eq!((counts.added, counts.added_bytes), (1, bytes));
            (bytes, pool.after_adding(counts.added_bytes))
        };
        // The first is measured: a walk.
        let (_, (first, removed)) = add("one");
        assert!(first >= 40 << 10 && removed == 0, "{first} {removed}");
        // Another consumer's entry: not counted until the pool is walked again.
        std::fs::create_dir(pool.dir().join("elsewhere")).unwrap();
        std::fs::write(
            pool.dir().join("elsewhere").join(OUTPUTS),
            vec![1u8; 40 << 10],
        )
        .unwrap();
        let (bytes, (second, removed)) = add("two");
        assert_eq!(
            (second, removed),
            (first + bytes, 0),
            "counted on, not walked"
        );
        // The third takes the count past the limit: walked, and trimmed back within it.
        let (_, (third, removed)) = add("three");
        assert!(removed >= 1 && third <= limit, "{third} {removed}");
    }
}
