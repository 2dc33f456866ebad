//! Dependency sources, extracted once per work directory and shown read-only to every job of
//! every consumer on it.
//!
//! Cargo extracts every dependency it downloads into its cargo home (`registry/src/<registry
//! dir>/<name>-<version>/`, marked done by a `.cargo-ok` file), and each job has a cargo home of
//! its own: so every job extracted its whole tree again, a third of a real crate's CPU time
//! (`tokio-rustls`: 296 MiB, 1.3 of a cold resolution's 1.45 CPU-s). Here the consumer extracts
//! each `.crate` once, itself, from the checksum-verified bytes its mirror serves, into a store
//! that every step sees read-only at [`crate::sandbox::SOURCES`]; when cargo downloads a
//! dependency, the mirror first links `registry/src/<registry dir>/<name>-<version>` in the job's
//! cargo home to the stored copy, so cargo finds it extracted (`.cargo-ok` says `{"v":1}`) and
//! extracts nothing. A version the store already holds is linked earlier still, as cargo reads
//! the crate's index file ([`JobSources::link_stored`]), with its archive: cargo then finds it
//! downloaded and extracted, and asks the mirror for nothing.
//!
//! What makes sharing safe: the store is written only by the consumer, outside any sandbox, with
//! the same refusals as a package under test (`unpack.rs`: no links, devices or escaping
//! paths); no step can write it (read-only bind); what cargo reads through the link is exactly
//! the archive whose sha256 the index gave. What the consumer will not store (an archive with a
//! link in it, say) is left to cargo to extract in the job, as before. The links are made before
//! cargo hears the download finished, in a directory the consumer creates itself and checks is
//! no link, while only cargo (Quarry's configuration, no package code) runs in the sandbox.
//!
//! Only for toolchains whose cargo reads `.cargo-ok` as `{"v":1}` (1.72 and later); an older
//! cargo would find the marker foreign and extract over the read-only copy. Bounded by
//! `consumer.sources_mb`: past it, the least recently used entries that no job in hand links are
//! removed.
//!
//! Every consumer on a work directory shares its store (`<work_dir>/sources`), so that two
//! consumers of one node extract a popular dependency once, not once each. What they agree on
//! goes through the filesystem, so a consumer that dies leaves nothing held:
//! - an entry is extracted under an exclusive `flock` of its `.making-<sha256>` file
//!   ([`crate::units::Making`]): a second consumer that needs it waits, then takes the first's;
//! - while a consumer's jobs link an entry, it holds a shared `flock` on the entry's directory,
//!   and an entry is removed only by one who got an exclusive lock on it (without waiting): no
//!   consumer removes what another's job reads;
//! - an entry is whole or absent (renamed into place), and a lock is trusted only when the
//!   directory it is on is still the one at the entry's name (not one renamed aside meanwhile).
//!
//! Each consumer counts what it knows of the store against the limit, and looks at the whole
//! store again at most [`crate::units::REMEASURE`] after its last look, as the pool does.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quarry_core::job::PackageVersion;

use crate::in_flight::InFlight;
use crate::metrics::Metrics;

/// Directory names of entries being extracted or removed, until they are done.
const PARTIAL: &str = ".partial-";
const REMOVED: &str = ".removed-";
/// In each entry, beside the package: the disk it takes, in bytes.
const SIZE: &str = "size";
/// What cargo (1.71.1 and later) writes into `.cargo-ok` once it extracted a package.
const EXTRACTED: &str = r#"{"v":1}"#;
/// The oldest release whose cargo reads [`EXTRACTED`] as done.
const OLDEST_RELEASE: (u64, u64) = (1, 72);

/// How old a half-extracted entry must be before a consumer that is not alone on the store
/// removes it: no extraction takes that long, so its extractor died.
const ABANDONED: std::time::Duration = std::time::Duration::from_secs(3600);

/// The store of extracted dependency sources of a work directory, as one consumer uses it.
pub struct Sources {
    dir: PathBuf,
    limit_bytes: u64,
    index: Mutex<Index>,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    /// A shared lock on `.open`, held for the consumer's life: one that opens the store while
    /// no other holds it may clear what dead consumers left.
    _open: File,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("dir", &self.dir)
            .field("limit_bytes", &self.limit_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    total_bytes: u64,
    /// Counts uses, for least recently used first.
    clock: u64,
    /// When the store's directory was last read whole (for what other consumers added).
    looked: Option<Instant>,
    /// Archives the store refused, by checksum, and why: a later job's download of the same
    /// archive is refused at once rather than unpacked again ([`REFUSALS_KEPT`] at most).
    refused: HashMap<String, String>,
}

/// Refused archives remembered; past it the memory starts over (each is then unpacked once more).
const REFUSALS_KEPT: usize = 10_000;

struct Entry {
    bytes: u64,
    last_used: u64,
    /// Jobs in hand that link it.
    users: usize,
    /// While `users` is not 0: the entry's directory, with a shared lock that keeps every
    /// consumer from removing it.
    held: Option<File>,
}

/// One job's use of the store: where its cargo home is, and the entries it links, which are
/// not removed until it is dropped (after the job's last step).
pub struct JobSources {
    sources: Arc<Sources>,
    cargo_home: PathBuf,
    /// Where the job's steps see the store.
    seen_at: PathBuf,
    held: Mutex<Vec<String>>,
    /// The dependencies whose archives the store would not extract, and why: said in the job's
    /// log (cargo met them in the sandbox instead).
    refused: Mutex<Vec<String>>,
    /// Cargo's name for the registry's directory, looked up at the job's first download: it
    /// names the source, which does not change within a job, so two lookups per download
    /// (sources and archive) would only list the same directories again.
    registry_name: std::sync::OnceLock<String>,
    /// The `registry/<sub>/<registry dir>` directories made so far (a job links a dependency
    /// at a time, each into both).
    made: Mutex<Vec<(&'static str, PathBuf)>>,
}

/// Why a dependency's sources are not in the store; cargo extracts them in the job instead.
enum NotStored {
    /// The archive is not one to extract outside the sandbox (`unpack` refused it).
    Refused(String),
    /// The store or the job's cargo home could not take it.
    Failed(String),
}

impl From<String> for NotStored {
    fn from(why: String) -> NotStored {
        NotStored::Failed(why)
    }
}

impl Sources {
    /// The store in `dir`, up to `limit_bytes`, keeping what is there (written by consumers, as
    /// here), shared with every other consumer that opens it.
    pub fn open(dir: PathBuf, limit_bytes: u64, metrics: Arc<Metrics>) -> std::io::Result<Sources> {
        std::fs::create_dir_all(&dir)?;
        let open = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(".open"))?;
        let alone = match open.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => false,
            Err(std::fs::TryLockError::Error(err)) => return Err(err),
        };
        let mut index = Index::default();
        look(&dir, &mut index, alone);
        // Waits for one that is clearing the store (it holds `.open` exclusively until done).
        open.lock_shared()?;
        metrics.sources_size(index.total_bytes);
        Ok(Sources {
            dir,
            limit_bytes,
            index: Mutex::new(index),
            in_flight: InFlight::default(),
            metrics,
            _open: open,
        })
    }

    /// The store's directory on this host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A job's use of the store, for a job whose cargo home is at `cargo_home` on this host and
    /// whose steps see the store at `seen_at`, built with a toolchain whose `rustc -vV` is
    /// `build`; `None` if that toolchain's cargo would not take a stored copy as extracted.
    pub fn for_job(
        self: &Arc<Self>,
        cargo_home: &Path,
        seen_at: &Path,
        build: &str,
    ) -> Option<Arc<JobSources>> {
        let release = build
            .lines()
            .find_map(|line| line.strip_prefix("release: "))?;
        let mut parts = release.split(['.', '-']);
        let major: u64 = parts.next()?.parse().ok()?;
        let minor: u64 = parts.next()?.parse().ok()?;
        ((major, minor) >= OLDEST_RELEASE).then(|| {
            Arc::new(JobSources {
                sources: self.clone(),
                cargo_home: cargo_home.to_owned(),
                seen_at: seen_at.to_owned(),
                held: Mutex::default(),
                refused: Mutex::default(),
                registry_name: std::sync::OnceLock::new(),
                made: Mutex::default(),
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a use of the entry `checksum` if the store has it, without waiting: an entry
    /// another consumer removed (or is removing) is forgotten.
    fn take(&self, checksum: &str) -> bool {
        let mut index = self.lock();
        index.clock += 1;
        let now = index.clock;
        let Some(entry) = index.entries.get_mut(checksum) else {
            return false;
        };
        if entry.users == 0 {
            match hold_entry(&self.dir.join(checksum), false) {
                Some(held) => entry.held = Some(held),
                None => {
                    let bytes = entry.bytes;
                    index.entries.remove(checksum);
                    index.total_bytes = index.total_bytes.saturating_sub(bytes);
                    return false;
                }
            }
        }
        entry.users += 1;
        entry.last_used = now;
        true
    }

    fn give_back(&self, checksum: &str) {
        let mut index = self.lock();
        if let Some(entry) = index.entries.get_mut(checksum) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                entry.held = None;
            }
        }
    }

    /// Takes a use of `package`'s entry, extracting `archive` (its checksum verified) into the
    /// store first if it is not there: once, however many jobs ask at once. `Err` says why it
    /// cannot be stored.
    async fn hold(
        &self,
        package: &PackageVersion,
        archive: &bytes::Bytes,
    ) -> Result<(), NotStored> {
        let checksum = package.checksum.to_ascii_lowercase();
        if !is_checksum(&checksum) {
            return Err(format!("{package}: {checksum:?} is not a sha256").into());
        }
        if self.take(&checksum) {
            self.metrics.source("shared");
            return Ok(());
        }
        let _turn = self.in_flight.turn(checksum.clone()).await;
        if self.take(&checksum) {
            self.metrics.source("shared");
            return Ok(());
        }
        if let Some(why) = self.lock().refused.get(&checksum) {
            return Err(NotStored::Refused(why.clone()));
        }
        let (dir, archive) = (self.dir.clone(), archive.clone());
        let root = package_dir(package);
        let entry = checksum.clone();
        let stored = tokio::task::spawn_blocking(move || store(&dir, &entry, &root, &archive))
            .await
            .map_err(|e| NotStored::Failed(format!("extracting panicked: {e}")))?;
        let (bytes, held, how) = match stored {
            Ok(stored) => stored,
            Err(NotStored::Refused(why)) => {
                let mut index = self.lock();
                if index.refused.len() >= REFUSALS_KEPT {
                    index.refused.clear();
                }
                index.refused.insert(checksum, why.clone());
                return Err(NotStored::Refused(why));
            }
            Err(failed) => return Err(failed),
        };
        let removed = {
            let mut index = self.lock();
            if index
                .looked
                .is_none_or(|at| at.elapsed() > crate::units::REMEASURE)
            {
                look(&self.dir, &mut index, false);
            }
            index.clock += 1;
            let now = index.clock;
            let known = index.entries.insert(
                checksum,
                Entry {
                    bytes,
                    last_used: now,
                    users: 1,
                    held: Some(held),
                },
            );
            // Just seen by a look at the store: counted already.
            let counted = known.map_or(0, |entry| entry.bytes);
            index.total_bytes = index.total_bytes - counted + bytes;
            let removed = self.evict(&mut index);
            self.metrics.sources_size(index.total_bytes);
            removed
        };
        self.metrics.source(how);
        if !removed.is_empty() {
            tokio::task::spawn_blocking(move || {
                for dir in removed {
                    let _ = std::fs::remove_dir_all(dir);
                }
            });
        }
        Ok(())
    }

    /// Past the limit, takes the least recently used entries no job of any consumer links out
    /// of the store (renamed aside at once, under an exclusive lock, so none is linked again)
    /// and returns where they are now.
    fn evict(&self, index: &mut Index) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        // Entries another consumer's jobs link: kept, this time.
        let mut linked_elsewhere = HashSet::new();
        while index.total_bytes > self.limit_bytes {
            let Some(oldest) = index
                .entries
                .iter()
                .filter(|(checksum, entry)| {
                    entry.users == 0 && !linked_elsewhere.contains(*checksum)
                })
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(checksum, _)| checksum.clone())
            else {
                break;
            };
            let path = self.dir.join(&oldest);
            match take_for_removal(&path) {
                Removal::Linked => {
                    linked_elsewhere.insert(oldest);
                    continue;
                }
                Removal::Gone => {}
                Removal::Held(_lock) => {
                    let aside = self
                        .dir
                        .join(format!("{REMOVED}{}", uuid::Uuid::new_v4().simple()));
                    if std::fs::rename(&path, &aside).is_ok() {
                        removed.push(aside);
                        self.metrics.source("removed");
                    }
                }
            }
            let entry = index.entries.remove(&oldest).expect("just found");
            index.total_bytes = index.total_bytes.saturating_sub(entry.bytes);
        }
        removed
    }
}

impl JobSources {
    /// Before cargo, in this job's resolving step, hears that `package` (whose bytes `archive`
    /// matched the index's checksum) is downloaded: makes it stored and links it where cargo
    /// would extract it. `Err` says why not; cargo then extracts it itself, as without a store.
    pub async fn link(
        &self,
        package: &PackageVersion,
        archive: &bytes::Bytes,
    ) -> Result<(), String> {
        let why = match self.try_link(package, archive).await {
            Ok(()) => return Ok(()),
            Err(NotStored::Refused(why)) => {
                let refused = format!("{package}: {why}");
                let mut said = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                // Once per job, though cargo may download it again (a second resolution).
                if !said.contains(&refused) {
                    said.push(refused.clone());
                }
                refused
            }
            Err(NotStored::Failed(why)) => why,
        };
        self.sources.metrics.source("left-to-cargo");
        Err(why)
    }

    /// The dependencies whose archives the store would not extract, and why.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn try_link(
        &self,
        package: &PackageVersion,
        archive: &bytes::Bytes,
    ) -> Result<(), NotStored> {
        let link = self.registry_dir("src")?.join(package_dir(package));
        if link.symlink_metadata().is_ok() {
            // Linked already (ahead of the download, or by a second resolution), or extracted
            // by cargo.
            return Ok(());
        }
        self.sources.hold(package, archive).await?;
        self.link_held(package, &link)
    }

    /// Which of `name`'s versions (with their checksums, from the index file) the store holds.
    pub fn stored(&self, name: &str, checksums: &HashMap<String, String>) -> Vec<PackageVersion> {
        let index = self.sources.lock();
        checksums
            .iter()
            .map(|(version, checksum)| (version, checksum.to_ascii_lowercase()))
            .filter(|(_, checksum)| index.entries.contains_key(checksum))
            .map(|(version, checksum)| PackageVersion {
                name: name.to_owned(),
                version: version.clone(),
                checksum,
            })
            .collect()
    }

    /// While cargo, in this job's resolving step, reads the index: links `package`, which the
    /// store holds, and its archive `cached` (see [`JobSources::link_archive`]) where cargo
    /// would download and extract it, so that cargo finds it done and asks for nothing. The
    /// archive is linked only once the sources are: cargo reads no archive whose sources it
    /// finds extracted, and one it finds alone it would extract itself. `Err` says why not;
    /// cargo then downloads it, and the download links it.
    pub fn link_stored(&self, package: &PackageVersion, cached: &Path) -> Result<(), String> {
        let link = self.registry_dir("src")?.join(package_dir(package));
        if link.symlink_metadata().is_ok() {
            return Ok(());
        }
        let checksum = package.checksum.to_ascii_lowercase();
        if !is_checksum(&checksum) || !self.sources.take(&checksum) {
            return Err("not in the store".to_owned());
        }
        self.link_held(package, &link).map_err(|why| match why {
            NotStored::Refused(why) | NotStored::Failed(why) => why,
        })?;
        self.sources.metrics.source("linked-ahead");
        self.link_archive(package, cached)
    }

    /// Links `link` to `package`'s entry, which the job has just taken a use of.
    fn link_held(&self, package: &PackageVersion, link: &Path) -> Result<(), NotStored> {
        let checksum = package.checksum.to_ascii_lowercase();
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.contains(&checksum) {
                self.sources.give_back(&checksum);
            } else {
                held.push(checksum.clone());
            }
        }
        let target = self.seen_at.join(&checksum).join(package_dir(package));
        if !self
            .sources
            .dir
            .join(&checksum)
            .join(package_dir(package))
            .is_dir()
        {
            return Err(NotStored::Refused(
                "its archive holds another package".to_owned(),
            ));
        }
        std::os::unix::fs::symlink(&target, link)
            .map_err(|e| NotStored::Failed(format!("cannot link {}: {e}", link.display())))
    }

    /// Before cargo, in this job's resolving step, hears that `package` is downloaded: links
    /// the consumer's copy of its archive, `cached` (the disk cache's file, whose sha256 the
    /// fetch just checked), where cargo keeps what it downloads. Cargo finds the file there,
    /// not empty, and keeps it rather than writing what it was sent (`finish_download`): the
    /// job creates no file for it, and removing the job frees no inode (on ext4 without a
    /// journal, freed inodes slow every file created after them, `host::spread_trees`).
    ///
    /// Safe to share: the cargo home is read-only to every step after the resolving one, which
    /// runs only cargo; and the disk cache checks a file's sha256 whenever it reads it, so even
    /// a copy changed through the link would be fetched again, never served. `Err` says why not;
    /// cargo then writes the file itself, as before.
    pub fn link_archive(&self, package: &PackageVersion, cached: &Path) -> Result<(), String> {
        let into = self.registry_dir("cache")?;
        let link = into.join(format!("{}-{}.crate", package.name, package.version));
        if link.symlink_metadata().is_ok() {
            return Ok(());
        }
        std::fs::hard_link(cached, &link).map_err(|e| {
            format!(
                "cannot link {} to {}: {e}",
                link.display(),
                cached.display()
            )
        })
    }

    /// The job's `registry/<sub>/<registry dir>` (`src` or `cache`), created if need be. Cargo
    /// names the registry's directory (`registry.quarry.invalid-<hash of the source>`, the hash
    /// its own), and has made it under `registry/index` by the time it downloads. Every
    /// directory on the way is checked to be one, not a link: nothing but cargo has run there,
    /// but nothing is followed.
    fn registry_dir(&self, sub: &'static str) -> Result<PathBuf, String> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, into)) = made.iter().find(|(made, _)| *made == sub) {
            return Ok(into.clone());
        }
        let registry = self.cargo_home.join("registry");
        let name = match self.registry_name.get() {
            Some(name) => name.clone(),
            None => {
                let name = registry_name(&registry)?;
                self.registry_name.get_or_init(|| name).clone()
            }
        };
        let parent = registry.join(sub);
        let into = parent.join(name);
        for dir in [&registry, &parent, &into] {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(format!("cannot create {}: {err}", dir.display())),
            }
            if !dir.symlink_metadata().is_ok_and(|meta| meta.is_dir()) {
                return Err(format!("{} is not a directory", dir.display()));
            }
        }
        made.push((sub, into.clone()));
        Ok(into)
    }
}

impl Drop for JobSources {
    fn drop(&mut self) {
        for checksum in self
            .held
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            self.sources.give_back(&checksum);
        }
    }
}

/// Reads the store at `dir` into `index`: each whole entry not in it yet, as used before every
/// entry it has (into an empty index, the oldest directory first). What was left half made or half removed goes, if
/// the reader is `alone` on the store or it is [`ABANDONED`].
fn look(dir: &Path, index: &mut Index, alone: bool) {
    index.looked = Some(Instant::now());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let modified = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if is_checksum(&name) {
            if index.entries.contains_key(&name) {
                continue;
            }
            if let Some(bytes) = std::fs::read_to_string(path.join(SIZE))
                .ok()
                .and_then(|size| size.trim().parse::<u64>().ok())
            {
                found.push((modified, name, bytes));
            }
            continue;
        }
        let left = [PARTIAL, REMOVED, crate::units::MAKING]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        if left && (alone || modified.elapsed().unwrap_or_default() > ABANDONED) {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                let _ = std::fs::remove_dir_all(&path);
            } else if alone {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    found.sort();
    let empty = index.entries.is_empty();
    for (_, name, bytes) in found {
        index.total_bytes += bytes;
        // Uses count from 1: 0 comes before any use.
        let last_used = if empty {
            index.clock += 1;
            index.clock
        } else {
            0
        };
        index.entries.insert(
            name,
            Entry {
                bytes,
                last_used,
                users: 0,
                held: None,
            },
        );
    }
}

/// The entry's directory at `path`, held with a shared lock (waiting for one who is removing
/// it, if `wait`); `None` if it is not there, or no longer there once locked.
fn hold_entry(path: &Path, wait: bool) -> Option<File> {
    let dir = open_directory(path)?;
    if wait {
        dir.lock_shared().ok()?;
    } else {
        dir.try_lock_shared().ok()?;
    }
    same_directory(&dir, path).then_some(dir)
}

/// The directory at `path`, opened to be locked; `None` if it is not one (or is a link).
fn open_directory(path: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .map(File::from)
}

/// Whether the directory `dir` is open on is still the one at `path` (not renamed aside).
fn same_directory(dir: &File, path: &Path) -> bool {
    match (dir.metadata(), path.symlink_metadata()) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// What taking an entry out of the store found.
enum Removal {
    /// Held exclusively: no consumer links it, and none can until the lock goes.
    Held(File),
    /// Some consumer's job links it.
    Linked,
    /// Not there (another consumer took it out).
    Gone,
}

fn take_for_removal(path: &Path) -> Removal {
    let Some(dir) = open_directory(path) else {
        return Removal::Gone;
    };
    match dir.try_lock() {
        Ok(()) if same_directory(&dir, path) => Removal::Held(dir),
        Ok(()) => Removal::Gone,
        Err(_) => Removal::Linked,
    }
}

/// The entry `checksum` of the store at `dir`, held: another consumer's if it is there, else
/// `archive` (the package `root`) extracted, once however many consumers ask at once. Returns
/// its size, its lock, and how it came ("shared" or "extracted").
fn store(
    dir: &Path,
    checksum: &str,
    root: &str,
    archive: &[u8],
) -> Result<(u64, File, &'static str), NotStored> {
    let adopt = || {
        let held = hold_entry(&dir.join(checksum), true)?;
        let bytes = std::fs::read_to_string(dir.join(checksum).join(SIZE))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()?;
        Some((bytes, held, "shared"))
    };
    if let Some(adopted) = adopt() {
        return Ok(adopted);
    }
    let _making =
        crate::units::Making::take(dir.join(format!("{}{checksum}", crate::units::MAKING)));
    if let Some(adopted) = adopt() {
        return Ok(adopted);
    }
    let extracted = extract(dir, checksum, root, archive);
    match (extracted, adopt()) {
        (Ok(_), Some((bytes, held, _))) => Ok((bytes, held, "extracted")),
        (Ok(_), None) => Err(NotStored::Failed(format!(
            "{root} was removed from the store as soon as it was extracted"
        ))),
        // Extracted by another consumer meanwhile (the lock could not be had): this one's
        // extraction still happened, and counts.
        (Err(NotStored::Failed(_)), Some((bytes, held, _))) => Ok((bytes, held, "extracted")),
        (Err(err), _) => Err(err),
    }
}

/// Extracts `archive` (the package `root`, `<name>-<version>`) into the store at `dir` as the
/// entry `checksum`, marked as cargo marks what it extracted; returns the disk it takes.
fn extract(dir: &Path, checksum: &str, root: &str, archive: &[u8]) -> Result<u64, NotStored> {
    let partial = dir.join(format!("{PARTIAL}{}", uuid::Uuid::new_v4().simple()));
    let stored = (|| {
        let unpacked =
            crate::unpack::unpack(archive, &partial, root).map_err(NotStored::Refused)?;
        let write = |path: PathBuf, text: &str| {
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        // Over any the archive had (cargo skips those).
        write(unpacked.root.join(".cargo-ok"), EXTRACTED)?;
        // With the marker and this file, a block each.
        let bytes = unpacked.bytes + 2 * 4096;
        write(partial.join(SIZE), &bytes.to_string())?;
        std::fs::rename(&partial, dir.join(checksum))
            .map_err(|e| format!("cannot store {root}: {e}"))?;
        Ok(bytes)
    })();
    if stored.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    stored
}

/// The one directory in the cargo home's `registry/index` and `registry/cache` that names
/// Quarry's registry endpoint.
fn registry_name(registry: &Path) -> Result<String, String> {
    let mut names = Vec::new();
    for sub in ["index", "cache"] {
        if let Ok(entries) = std::fs::read_dir(registry.join(sub)) {
            names.extend(
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| is_registry_dir(name)),
            );
        }
    }
    names.sort();
    names.dedup();
    match <[String; 1]>::try_from(names) {
        Ok([name]) => Ok(name),
        Err(names) => Err(format!(
            "cargo's directory for the registry is not one in {}: {names:?}",
            registry.display()
        )),
    }
}

/// The directory a package's archive extracts to, and cargo's name for it: `<name>-<version>`.
fn package_dir(package: &PackageVersion) -> String {
    format!("{}-{}", package.name, package.version)
}

fn is_checksum(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `name` is what cargo names the directory of Quarry's registry endpoint.
fn is_registry_dir(name: &str) -> bool {
    name.strip_prefix(crate::gateway::REGISTRY_HOST)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hash| !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILD: &str = "rustc 1.95.0 (59807616e 2026-04-14)\nrelease: 1.95.0\n";

    /// A `.crate` of `root` holding `entries` (path under the root, type, content).
    fn archive(root: &str, entries: &[(&str, tar::EntryType, &[u8])]) -> bytes::Bytes {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            if kind.is_symlink() {
                header.set_link_name("/etc/passwd").unwrap();
            }
            header.set_path(format!("{root}/{path}")).unwrap();
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap().into()
    }

    fn package(name: &str, archive: &bytes::Bytes) -> PackageVersion {
        use sha2::Digest as _;
        PackageVersion {
            name: name.to_owned(),
            version: "1.0.0".to_owned(),
            checksum: hex::encode(sha2::Sha256::digest(archive)),
        }
    }

    fn plain(name: &str, filler: usize) -> bytes::Bytes {
        let filler = vec![b'x'; filler];
        archive(
            &format!("{name}-1.0.0"),
            &[
                ("Cargo.toml", tar::EntryType::Regular, b"[package]"),
                ("src/lib.rs", tar::EntryType::Regular, &filler),
            ],
        )
    }

    /// The packages `a`, `b` and `c`, each about 60 KiB extracted: their archives, and what
    /// the index says of them.
    fn three_of_60_kib() -> (Vec<bytes::Bytes>, Vec<PackageVersion>) {
        ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let archive = plain(name, 60 << 10);
                let package = package(name, &archive);
                (archive, package)
            })
            .unzip()
    }

    /// A job's cargo home as cargo leaves it by the time it downloads.
    fn cargo_home(dir: &Path) -> PathBuf {
        let home = dir.join("cargo-home");
        std::fs::create_dir_all(home.join("registry/index/registry.quarry.invalid-0123abcd"))
            .unwrap();
        home
    }

    fn store(dir: &Path, limit_bytes: u64) -> Arc<Sources> {
        let metrics = Arc::new(Metrics::new().unwrap());
        Arc::new(Sources::open(dir.join("store"), limit_bytes, metrics).unwrap())
    }

    fn stored(sources: &Sources) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(sources.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| is_checksum(name))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_dependency_is_extracted_once_and_linked_where_cargo_looks() {
        let dir = tempfile::tempdir().unwrap();
        let sources = store(dir.path(), 1 << 30);
        let bytes = plain("a", 10);
        let a = package("a", &bytes);
        let mut links = Vec::new();
        for job in ["one", "two"] {
            let home = cargo_home(&dir.path().join(job));
            let job = sources
                .for_job(&home, Path::new("/run/quarry/sources"), BUILD)
                .unwrap();
            job.link(&a, &bytes).await.unwrap();
            let link = home.join("registry/src/registry.quarry.invalid-0123abcd/a-1.0.0");
            links.push(std::fs::read_link(&link).unwrap());
            // Linked already: nothing changes.
            job.link(&a, &bytes).await.unwrap();
        }
        let expected = Path::new("/run/quarry/sources")
            .join(&a.checksum)
            .join("a-1.0.0");
        assert_eq!(links, [expected.clone(), expected]);
        assert_eq!(
            stored(&sources),
            std::slice::from_ref(&a.checksum),
            "extracted once"
        );
        let copy = sources.dir().join(&a.checksum).join("a-1.0.0");
        assert_eq!(
            std::fs::read_to_string(copy.join(".cargo-ok")).unwrap(),
            r#"{"v":1}"#
        );
        assert_eq!(
            std::fs::read_to_string(copy.join("src/lib.rs")).unwrap(),
            "x".repeat(10)
        );
    }

    #[test]
    fn the_archive_cargo_would_write_is_the_disk_caches_file_linked() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sources = store(dir.path(), 1 << 30);
        let bytes = plain("a", 10);
        let a = package("a", &bytes);
        let cached = dir.path().join("a-1.0.0-cached.crate");
        std::fs::write(&cached, &bytes).unwrap();
        let home = cargo_home(dir.path());
        let job = sources
            .for_job(&home, Path::new("/run/quarry/sources"), BUILD)
            .unwrap();
        job.link_archive(&a, &cached).unwrap();
        // A second download of it in the job (a second resolution): nothing changes.
        job.link_archive(&a, &cached).unwrap();
        let placed = home.join("registry/cache/registry.quarry.invalid-0123abcd/a-1.0.0.crate");
        let (placed, cached) = (placed.metadata().unwrap(), cached.metadata().unwrap());
        assert_eq!(placed.ino(), cached.ino(), "one file, no new inode");
        assert_eq!(placed.nlink(), 2);
        // Gone from the disk cache: cargo writes it itself.
        let b = package("b", &plain("b", 1));
        let missing = dir.path().join("b-1.0.0-cached.crate");
        assert!(job.link_archive(&b, &missing).is_err());
    }

    #[tokio::test]
    async fn stored_versions_are_linked_as_cargo_reads_the_index_and_only_they() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sources = store(dir.path(), 1 << 30);
        let bytes = plain("a", 10);
        let a = package("a", &bytes);
        let cached = dir.path().join("a-1.0.0-cached.crate");
        std::fs::write(&cached, &bytes).unwrap();
        // An earlier job downloaded 1.0.0.
        let earlier = sources
            .for_job(
                &cargo_home(&dir.path().join("earlier")),
                Path::new("/run/quarry/sources"),
                BUILD,
            )
            .unwrap();
        earlier.link(&a, &bytes).await.unwrap();
        drop(earlier);
        // The index has 1.0.0 (its checksum in capitals, as the store's names never are) and
        // 1.1.0, which no job downloaded: only 1.0.0 is linked, under the store's name.
        let home = cargo_home(&dir.path().join("job"));
        let job = sources
            .for_job(&home, Path::new("/run/quarry/sources"), BUILD)
            .unwrap();
        let index: HashMap<String, String> = [
            ("1.0.0".to_owned(), a.checksum.to_uppercase()),
            ("1.1.0".to_owned(), "ab".repeat(32)),
        ]
        .into();
        let stored = job.stored("a", &index);
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(
            (stored[0].version.as_str(), stored[0].checksum.as_str()),
            ("1.0.0", a.checksum.as_str())
        );
        job.link_stored(&stored[0], &cached).unwrap();
        // Read again (a second resolution): nothing changes.
        job.link_stored(&stored[0], &cached).unwrap();
        let registry = home.join("registry");
        assert_eq!(
            std::fs::read_link(registry.join("src/registry.quarry.invalid-0123abcd/a-1.0.0"))
                .unwrap(),
            Path::new("/run/quarry/sources")
                .join(&a.checksum)
                .join("a-1.0.0")
        );
        let placed = registry
            .join("cache/registry.quarry.invalid-0123abcd/a-1.0.0.crate")
            .metadata()
            .unwrap();
        assert_eq!(placed.ino(), cached.metadata().unwrap().ino());
        // Cargo would download the version the store lacks, and the download links it.
        let other = PackageVersion {
            version: "1.1.0".to_owned(),
            checksum: "ab".repeat(32),
            ..a.clone()
        };
        assert!(job.link_stored(&other, &cached).is_err());
        assert!(
            !registry
                .join("src/registry.quarry.invalid-0123abcd/a-1.1.0")
                .exists()
        );
        // Held while the job is in hand: past the limit, nothing it linked ahead goes.
        let index = sources.lock();
        assert_eq!(index.entries[&a.checksum].users, 1);
    }

    #[tokio::test]
    async fn what_cannot_be_stored_is_left_to_cargo() {
        let dir = tempfile::tempdir().unwrap();
        let sources = store(dir.path(), 1 << 30);
        let home = cargo_home(dir.path());
        let job = sources
            .for_job(&home, Path::new("/run/quarry/sources"), BUILD)
            .unwrap();
        let linked = archive(
            "b-1.0.0",
            &[
                ("Cargo.toml", tar::EntryType::Regular, b"[package]"),
                ("passwd", tar::EntryType::Symlink, b""),
            ],
        );
        let err = job.link(&package("b", &linked), &linked).await.unwrap_err();
        assert!(err.contains("Symlink"), "{err}");
        // Remembered: another job's download of that archive is refused without unpacking it
        // again (here bytes that would unpack, under the refused archive's checksum).
        let again = sources
            .for_job(
                &cargo_home(&dir.path().join("again")),
                Path::new("/run/quarry/sources"),
                BUILD,
            )
            .unwrap();
        let err = again
            .link(&package("b", &linked), &plain("b", 1))
            .await
            .unwrap_err();
        assert!(err.contains("Symlink"), "{err}");
        // Another package's archive under this one's checksum.
        let other = plain("c", 1);
        let err = job.link(&package("d", &other), &other).await.unwrap_err();
        assert!(err.contains("escapes"), "{err}");
        let src = home.join("registry/src/registry.quarry.invalid-0123abcd");
        assert_eq!(
            std::fs::read_dir(&src).unwrap().count(),
            0,
            "nothing linked"
        );
        assert!(stored(&sources).is_empty());
        // A cargo home where cargo made no registry directory yet, or one that is a link.
        let bare = dir.path().join("bare");
        std::fs::create_dir_all(bare.join("registry/index/registry.quarry.invalid-77")).unwrap();
        std::os::unix::fs::symlink(dir.path(), bare.join("registry/src")).unwrap();
        let job = sources
            .for_job(&bare, Path::new("/run/quarry/sources"), BUILD)
            .unwrap();
        let bytes = plain("a", 1);
        let err = job.link(&package("a", &bytes), &bytes).await.unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        assert!(!dir.path().join("registry.quarry.invalid-77").exists());
    }

    #[tokio::test]
    async fn past_the_limit_the_least_recently_used_unlinked_go_first() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about two.
        let sources = store(dir.path(), 192 << 10);
        let (archives, packages) = three_of_60_kib();
        let home = |job: &str| cargo_home(&dir.path().join(job));
        let seen = Path::new("/run/quarry/sources");
        let holding_a = sources.for_job(&home("one"), seen, BUILD).unwrap();
        holding_a.link(&packages[0], &archives[0]).await.unwrap();
        {
            let job = sources.for_job(&home("two"), seen, BUILD).unwrap();
            job.link(&packages[1], &archives[1]).await.unwrap();
        }
        let job = sources.for_job(&home("three"), seen, BUILD).unwrap();
        job.link(&packages[2], &archives[2]).await.unwrap();
        // `a` is older than `b`, but a job in hand links it.
        let mut expected = vec![packages[0].checksum.clone(), packages[2].checksum.clone()];
        expected.sort();
        assert_eq!(stored(&sources), expected);
    }

    #[test]
    fn a_cargo_older_than_the_marker_shares_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sources = store(dir.path(), 1 << 30);
        let home = dir.path().join("cargo-home");
        let seen = Path::new("/run/quarry/sources");
        assert!(
            sources
                .for_job(&home, seen, "rustc 1.70.0\nrelease: 1.70.0\n")
                .is_none()
        );
        assert!(
            sources
                .for_job(&home, seen, "release: 1.96.0-nightly\n")
                .is_some()
        );
    }

    /// Two consumers on one work directory (each its own `Sources`, as two processes have).
    #[tokio::test]
    async fn consumers_on_one_work_directory_extract_a_dependency_once() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (store(dir.path(), 1 << 30), store(dir.path(), 1 << 30));
        let bytes = plain("a", 1 << 20);
        let a = package("a", &bytes);
        let seen = Path::new("/run/quarry/sources");
        let jobs: Vec<_> = [(&first, "one"), (&second, "two"), (&first, "three")]
            .into_iter()
            .map(|(sources, job)| {
                sources
                    .for_job(&cargo_home(&dir.path().join(job)), seen, BUILD)
                    .unwrap()
            })
            .collect();
        // All at once: one extracts, the others wait for it and take its copy.
        let linked = futures::future::join_all(jobs.iter().map(|job| job.link(&a, &bytes))).await;
        assert!(linked.iter().all(Result::is_ok), "{linked:?}");
        let extracted = |sources: &Sources| {
            let text = sources.metrics.render();
            text.lines()
                .find_map(|line| {
                    line.strip_prefix(r#"quarry_consumer_sources_total{how="extracted"} "#)
                })
                .map_or(0, |count| count.parse::<u64>().unwrap())
        };
        assert_eq!(extracted(&first) + extracted(&second), 1);
        assert_eq!(stored(&first), std::slice::from_ref(&a.checksum));
        let making: Vec<_> = std::fs::read_dir(first.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".making-"))
            .collect();
        assert!(making.is_empty(), "no lock is left behind: {making:?}");
    }

    #[tokio::test]
    async fn no_consumer_removes_what_another_consumers_job_links() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about two; the second consumer's view of the store is from its opening.
        let first = store(dir.path(), 192 << 10);
        let second = store(dir.path(), 192 << 10);
        let seen = Path::new("/run/quarry/sources");
        let (archives, packages) = three_of_60_kib();
        let job = |sources: &Arc<Sources>, name: &str| {
            sources
                .for_job(&cargo_home(&dir.path().join(name)), seen, BUILD)
                .unwrap()
        };
        // The first consumer's job links `a`; the second consumer's jobs add `b` and `c`.
        let holding_a = job(&first, "one");
        holding_a.link(&packages[0], &archives[0]).await.unwrap();
        {
            let two = job(&second, "two");
            two.link(&packages[0], &archives[0]).await.unwrap();
            two.link(&packages[1], &archives[1]).await.unwrap();
        }
        let three = job(&second, "three");
        three.link(&packages[2], &archives[2]).await.unwrap();
        // The second saw `a` as its least recently used, but the first's job links it.
        let mut expected = vec![packages[0].checksum.clone(), packages[2].checksum.clone()];
        expected.sort();
        assert_eq!(stored(&second), expected);
        let a = first
            .dir()
            .join(&packages[0].checksum)
            .join("a-1.0.0/src/lib.rs");
        assert_eq!(std::fs::read(&a).unwrap().len(), 60 << 10);
        // Once that job is done, `a` may go; a job of the first consumer that needs it again
        // (its view still has it) finds it gone and extracts it anew.
        drop(holding_a);
        let four = job(&second, "four");
        four.link(&packages[1], &archives[1]).await.unwrap();
        assert!(!stored(&second).contains(&packages[0].checksum));
        let five = job(&first, "five");
        five.link(&packages[0], &archives[0]).await.unwrap();
        assert_eq!(std::fs::read(&a).unwrap().len(), 60 << 10);
    }
}
