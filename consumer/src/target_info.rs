//! What cargo asks rustc before it resolves, kept from one job's resolution for the next.
//!
//! Before `cargo fetch` resolves, cargo asks the toolchain's rustc who it is and what its target
//! is (`rustc -vV`, then `--print cfg`, `--print file-names`...: three rustc processes), and
//! keeps the answers in `.rustc_info.json` in the target directory, if that directory exists.
//! The resolving step's target directory is new in every job, and cargo does not create it for
//! `fetch`: so every job's resolution (and re-resolution) asked again. Here the consumer creates
//! that directory, takes the file cargo wrote there after a job's resolution, once per
//! toolchain, and puts it in every later job's before its resolution.
//!
//! What makes the copy safe to hand on: only cargo, with Quarry's configuration, and the
//! toolchain's own rustc run in the resolving step; no code of the package does. Cargo checks
//! the file against the rustc it would run (its path, size and times, and each query's command
//! line) and asks rustc again for whatever does not match, so a stale copy costs the queries,
//! never a wrong answer. The consumer reads it as bytes, never follows a link to it, and never
//! parses it.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Mutex;

/// Cargo's name for the file, in the target directory.
const FILE: &str = ".rustc_info.json";
/// Larger than any cargo writes (about a kilobyte): a larger file is not kept.
const LIMIT_BYTES: u64 = 64 << 10;

/// The file cargo wrote, per toolchain (its `rustup` name).
#[derive(Debug, Default)]
pub struct TargetInfo {
    kept: Mutex<HashMap<String, Vec<u8>>>,
}

impl TargetInfo {
    /// Before a job's resolution: creates its target directory `target_dir` (so that cargo
    /// writes what it learns there) with the file kept for `toolchain`, if any. A failure
    /// costs only the queries: cargo asks rustc, as it would without.
    pub fn give(&self, toolchain: &str, target_dir: &Path) {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let given = std::fs::create_dir_all(target_dir).and_then(|()| match kept.get(toolchain) {
            Some(bytes) => {
                use std::io::Write as _;
                // A new file: nothing there is written through.
                std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(target_dir.join(FILE))?
                    .write_all(bytes)
            }
            None => Ok(()),
        });
        if let Err(err) = given {
            tracing::debug!(dir = %target_dir.display(), %err, "cargo asks rustc again");
        }
    }

    /// After a job's resolution succeeded: keeps the file cargo wrote in `target_dir` for
    /// `toolchain`, if none is kept yet.
    pub fn keep(&self, toolchain: &str, target_dir: &Path) {
        if self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(toolchain)
        {
            return;
        }
        if let Some(bytes) = read_plain(&target_dir.join(FILE)) {
            self.kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(toolchain.to_owned())
                .or_insert(bytes);
        }
    }
}

/// A regular file's bytes, through no link (the step's directory is the sandbox's to write),
/// `None` if it is anything else, missing or too large.
fn read_plain(path: &Path) -> Option<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS,
    )
    .ok()?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > LIMIT_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(LIMIT_BYTES).read_to_end(&mut bytes).ok()?;
    (!bytes.is_empty()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_one_resolution_learned_is_given_to_the_next_and_no_link_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let info = TargetInfo::default();
        let (first, second) = (dir.path().join("a/target"), dir.path().join("b/target"));
        // Nothing kept yet: the directory is made, for cargo to write in.
        info.give("stable", &first);
        assert!(first.is_dir() && !first.join(FILE).exists());
        std::fs::write(first.join(FILE), br#"{"rustc_fingerprint":1}"#).unwrap();
        info.keep("stable", &first);
        info.give("stable", &second);
        assert_eq!(
            std::fs::read(second.join(FILE)).unwrap(),
            br#"{"rustc_fingerprint":1}"#
        );
        // Another toolchain's is its own.
        let third = dir.path().join("c/target");
        info.give("nightly", &third);
        assert!(!third.join(FILE).exists());
        // A link where the file should be is not read through.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"the host's").unwrap();
        std::os::unix::fs::symlink(&secret, third.join(FILE)).unwrap();
        info.keep("nightly", &third);
        info.give("nightly", &dir.path().join("d/target"));
        assert!(!dir.path().join("d/target").join(FILE).exists());
    }
}
