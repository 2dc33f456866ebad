//! The consumer's experiment slots, and the target directory each keeps across its jobs so
//! that a dependency compiled once is reused by the slot's later jobs instead of rebuilt.
//!
//! One target directory per slot and toolchain: cargo locks a target directory for the whole
//! build, so slots never share one, and a slot runs one job at a time. Cargo decides what is
//! fresh from its fingerprints (package checksum, features, profile, target, the exact `rustc
//! -vV`, flags), and every path it hashes is the same in every job (the sandbox shows the job's
//! cargo home and the slot's target directory at fixed places). What makes keeping it safe is
//! `confine.rs`: no code of a package can write there except its own unit's outputs.
//!
//! Only the modes whose steps all go through that confinement keep one (`check`, `build`,
//! `clippy`): `test` runs test binaries and `doc` rustdoc, which cargo does not start through
//! the wrapper, and a custom command runs anything; they get a fresh target directory per job.
//!
//! Past its size limit, after a job, a slot's directory is removed whole (set aside first, so
//! the next job starts at once on an empty one): one job's cost once, rather than a partial
//! eviction that leaves fingerprints naming removed files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use quarry_core::job::Mode;

/// Directory name of removed slot directories, until they are gone.
const REMOVED: &str = ".removed-";

/// The slots: at most as many jobs run their code at once, each holding one, numbered.
pub struct Slots {
    permits: tokio::sync::Semaphore,
    free: Mutex<Vec<usize>>,
    /// `None`: no target directory is kept (no confinement here, or limit 0).
    targets: Option<SharedTargets>,
}

/// A slot held by a job; given back when dropped.
pub struct Slot<'a> {
    slots: &'a Slots,
    index: usize,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots
            .free
            .lock()
            .expect("never poisoned")
            .push(self.index);
    }
}

struct SharedTargets {
    dir: PathBuf,
    limit_bytes: u64,
    /// Each slot's size after its last job, for what a job added.
    sizes: Mutex<Vec<u64>>,
}

/// What a slot's target directory came to after a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterJob {
    /// What the job added to it (0 if it shrank).
    pub added_bytes: u64,
    /// Its size now (0 once removed).
    pub size_bytes: u64,
    /// Whether it went past the limit and was removed.
    pub removed: bool,
}

impl Slots {
    /// `count` slots; with `targets`, each keeps target directories under that directory, up
    /// to that many bytes (what a previous process left there is kept: it was written under
    /// the same confinement).
    pub fn new(count: usize, targets: Option<(PathBuf, u64)>) -> std::io::Result<Slots> {
        let targets = match targets {
            Some((dir, limit_bytes)) if limit_bytes > 0 => {
                std::fs::create_dir_all(&dir)?;
                crate::host::spread_trees(&dir);
                remove_set_aside(&dir);
                Some(SharedTargets {
                    dir,
                    limit_bytes,
                    sizes: Mutex::new(vec![u64::MAX; count]),
                })
            }
            _ => None,
        };
        Ok(Slots {
            permits: tokio::sync::Semaphore::new(count),
            free: Mutex::new((0..count).rev().collect()),
            targets,
        })
    }

    /// Waits for a free slot (cancel-safe: nothing is taken until it returns).
    pub async fn acquire(&self) -> Slot<'_> {
        let permit = self.permits.acquire().await.expect("never closed");
        let index = self
            .free
            .lock()
            .expect("never poisoned")
            .pop()
            .expect("a permit means a free slot");
        Slot {
            slots: self,
            index,
            _permit: permit,
        }
    }

    /// The target directory `slot` keeps for jobs of `mode` with the toolchain `rustup_name`
    /// and the flags `variant` (the side's rustflags, target and lint cap: jobs whose flags
    /// differ would only rebuild each other's units), created; `None` where none is kept for
    /// them.
    pub fn target(
        &self,
        slot: &Slot<'_>,
        mode: Mode,
        rustup_name: &str,
        variant: &str,
    ) -> Option<PathBuf> {
        use sha2::Digest as _;
        let targets = self.targets.as_ref()?;
        if !matches!(mode, Mode::Check | Mode::Build | Mode::Clippy) {
            return None;
        }
        let variant = hex::encode(&sha2::Sha256::digest(variant)[..6]);
        let dir = targets
            .slot_dir(slot.index)
            .join(format!("{rustup_name}-{variant}"));
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir)
    }

    /// Measures `slot`'s directory after a job, and removes it past the limit.
    pub async fn after_job(&self, slot: &Slot<'_>) -> AfterJob {
        let Some(targets) = &self.targets else {
            return AfterJob::default();
        };
        let dir = targets.slot_dir(slot.index);
        let size = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || disk_used(&dir))
                .await
                .unwrap_or(0)
        };
        let before = std::mem::replace(
            &mut targets.sizes.lock().expect("never poisoned")[slot.index],
            size,
        );
        let mut after = AfterJob {
            // Unknown before a slot's first job: what a previous process left is not this
            // job's.
            added_bytes: if before == u64::MAX {
                0
            } else {
                size.saturating_sub(before)
            },
            size_bytes: size,
            removed: false,
        };
        if size > targets.limit_bytes {
            set_aside_and_remove(&dir);
            targets.sizes.lock().expect("never poisoned")[slot.index] = 0;
            after.size_bytes = 0;
            after.removed = true;
        }
        after
    }
}

impl SharedTargets {
    fn slot_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("slot-{index}"))
    }
}

/// Renames `dir` aside and removes it on a blocking thread.
fn set_aside_and_remove(dir: &Path) {
    let aside = dir.with_file_name(format!(
        "{REMOVED}{}-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    match std::fs::rename(dir, &aside) {
        Ok(()) => {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&aside));
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Removes what an earlier process set aside and did not finish removing.
fn remove_set_aside(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(REMOVED) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The disk the files under `root` take (allocated blocks, links not followed). Without
/// recursion: a package's build scripts choose how deep a tree is.
pub fn disk_used(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut used = 0;
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // `DirEntry::metadata` does not follow a link.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            used += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slots_target_is_kept_until_it_passes_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(2, Some((dir.path().to_owned(), 1 << 20))).unwrap();
        let (first, second) = (slots.acquire().await, slots.acquire().await);
        assert_ne!(first.index, second.index, "two jobs never share a slot");
        assert_eq!(slots.target(&first, Mode::Test, "stable", ""), None);
        let target = slots.target(&first, Mode::Check, "stable", "").unwrap();
        assert!(target.starts_with(dir.path()));
        assert_ne!(
            Some(target.clone()),
            slots.target(&second, Mode::Check, "stable", "")
        );
        assert_ne!(
            Some(target.clone()),
            slots.target(&first, Mode::Check, "stable", "-Dwarnings")
        );

        std::fs::write(target.join("unit"), vec![1u8; 64 << 10]).unwrap();
        let kept = slots.after_job(&first).await;
        assert!(!kept.removed);
        assert!(target.join("unit").exists(), "kept under the limit");
        std::fs::write(target.join("more"), vec![1u8; 256 << 10]).unwrap();
        let grown = slots.after_job(&first).await;
        assert!(grown.added_bytes >= 256 << 10, "{grown:?}");

        std::fs::write(target.join("huge"), vec![1u8; 2 << 20]).unwrap();
        let past = slots.after_job(&first).await;
        assert!(past.removed, "{past:?}");
        assert!(!target.exists(), "removed whole past the limit");
        let again = slots.target(&first, Mode::Build, "stable", "").unwrap();
        assert!(std::fs::read_dir(again).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn without_a_limit_no_target_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(1, Some((dir.path().to_owned(), 0))).unwrap();
        let slot = slots.acquire().await;
        assert_eq!(slots.target(&slot, Mode::Check, "stable", ""), None);
    }
}
