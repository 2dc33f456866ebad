//! Unpacking a `.crate` (a gzipped tar) into a job's scratch directory, refusing what a package
//! archive has no business containing: links, devices, paths that escape the directory, and
//! archives that expand past the size or entry limits, and anything outside the package's own
//! `<name>-<version>/` directory (cargo refuses those too), which would land above the package,
//! where cargo looks for configuration.
//!
//! Files keep their executable bits (a build script may run a shipped `configure`), as cargo
//! keeps them, but nothing is writable by others than the consumer's user, and every
//! directory is one that user can empty, so that what is unpacked can always be removed.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

const MAX_ENTRIES: usize = 100_000;
const MAX_UNPACKED_BYTES: u64 = 1 << 30;

/// What [`unpack`] made.
#[derive(Debug)]
pub struct Unpacked {
    /// The package's root, `<into>/<name>-<version>`.
    pub root: PathBuf,
    /// The disk its files and directories take, in 4 KiB blocks, as counted while writing them
    /// (no walk afterwards; a file the archive holds twice is counted twice).
    pub bytes: u64,
}

/// Unpacks `archive` into `into`, which must be a directory no one else writes (a job's scratch
/// directory, a store's partial entry).
///
/// Entries are written directly, not through `tar`'s `unpack_in`: that one resolves the real path
/// of the destination and of each entry's directory (a `stat` per component per entry) to
/// catch links planted by earlier entries, and creates every entry's directories again. Here no
/// link can exist below `into` (link entries are refused, every path is plain components under
/// `expected_root`), so the directories made are remembered and each file is one
/// `open(O_CREAT|O_EXCL)`, one write, its time and its mode. A real crate's tree extracts with
/// a third of the system calls.
pub fn unpack(archive: &[u8], into: &Path, expected_root: &str) -> Result<Unpacked, String> {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut total: u64 = 0;
    let mut made = Directories::new(into);
    let mut contents = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| format!("corrupt archive: {e}"))?;
        if n >= MAX_ENTRIES {
            return Err(format!("archive has more than {MAX_ENTRIES} entries"));
        }
        let path = entry
            .path()
            .map_err(|e| format!("bad path in archive: {e}"))?
            .into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            || !path.starts_with(expected_root)
        {
            return Err(format!(
                "archive entry {} escapes the package directory",
                path.display()
            ));
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(format!(
                "archive entry {} is a {:?}, not a file or directory",
                path.display(),
                kind
            ));
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        total = total.saturating_add(size);
        if total > MAX_UNPACKED_BYTES {
            return Err(format!(
                "archive expands past {} MiB",
                MAX_UNPACKED_BYTES >> 20
            ));
        }
        let cannot = |e: std::io::Error| format!("cannot unpack {}: {e}", path.display());
        let dst = into.join(&path);
        if kind.is_dir() {
            made.make(&dst).map_err(cannot)?;
            continue;
        }
        if let Some(parent) = dst.parent() {
            made.make(parent).map_err(cannot)?;
        }
        // As cargo's extraction keeps them: the archive's mode without others' or the group's
        // write bit, and its time.
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777 & !0o022;
        let mtime = entry.header().mtime().ok();
        contents.clear();
        entry.read_to_end(&mut contents).map_err(cannot)?;
        let file = create(&dst, mode).map_err(cannot)?;
        write_file(file, &contents, mode, mtime).map_err(cannot)?;
        made.bytes += blocks(contents.len() as u64);
    }
    let root = into.join(expected_root);
    if !root.join("Cargo.toml").is_file() {
        return Err(format!(
            "archive has no {expected_root}/Cargo.toml at its top"
        ));
    }
    Ok(Unpacked {
        root,
        bytes: made.bytes,
    })
}

/// The directories made below the destination so far, and the disk taken.
struct Directories {
    made: HashSet<PathBuf>,
    bytes: u64,
}

impl Directories {
    fn new(into: &Path) -> Directories {
        Directories {
            made: HashSet::from([into.to_owned()]),
            bytes: 0,
        }
    }

    /// Makes `dir` and what is missing above it (always `rwxr-xr-x`, so that the consumer can
    /// empty it whatever the archive says).
    fn make(&mut self, dir: &Path) -> std::io::Result<()> {
        if self.made.contains(dir) {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.make(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            // Only an entry of this archive can have made it: a file of the same name.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && !dir.is_dir() => {
                return Err(err);
            }
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => return Err(err),
            Err(_) => {}
        }
        // The process's umask may be stricter than the mode asked for.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        self.bytes += blocks(0);
        self.made.insert(dir.to_owned());
        Ok(())
    }
}

/// A new file at `path`; an archive that holds the same path twice gets its last copy, as from
/// cargo's extraction.
fn create(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    let open = || {
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(mode | 0o600)
            .open(path)
    };
    match open() {
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && !path.is_dir() => {
            std::fs::remove_file(path)?;
            open()
        }
        opened => opened,
    }
}

fn write_file(
    mut file: std::fs::File,
    contents: &[u8],
    mode: u32,
    mtime: Option<u64>,
) -> std::io::Result<()> {
    file.write_all(contents)?;
    if let Some(seconds) = mtime {
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))?;
    }
    // Opened writable by its owner whatever the archive says; the umask may have taken bits.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// The disk a file of `len` bytes takes, in whole 4 KiB blocks (a directory: one).
fn blocks(len: u64) -> u64 {
    len.div_ceil(4096).max(1) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let typed: Vec<_> = entries
            .iter()
            .map(|(path, data)| (*path, tar::EntryType::Regular, *data, ""))
            .collect();
        archive_of(&typed)
    }

    /// Entries of any type: (path, type, content, link target).
    fn archive_of(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data, target) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            let link = &mut header.as_old_mut().linkname;
            link[..target.len()].copy_from_slice(target.as_bytes());
            // set_path refuses `..`; write the raw name to craft hostile archives.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn unpacks_a_package() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(&[
            ("a-1.0.0/Cargo.toml", b"[package]"),
            ("a-1.0.0/src/lib.rs", b""),
        ]);
        let unpacked = unpack(&bytes, dir.path(), "a-1.0.0").unwrap();
        assert!(unpacked.root.join("src/lib.rs").is_file());
        // Two files, two directories (the package's and `src`), a block each.
        assert_eq!(unpacked.bytes, 4 * 4096);
    }

    #[test]
    fn refuses_entries_beside_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(&[
            ("a-1.0.0/Cargo.toml", b"[package]"),
            (".cargo/config.toml", b"[alias]\nb = \"run\""),
        ]);
        let err = unpack(&bytes, dir.path(), "a-1.0.0").unwrap_err();
        assert!(err.contains(".cargo/config.toml escapes"), "{err}");
        assert!(!dir.path().join(".cargo").exists());
    }

    #[test]
    fn refuses_paths_that_escape() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(&[("a-1.0.0/../../evil", b"x")]);
        let err = unpack(&bytes, dir.path(), "a-1.0.0").unwrap_err();
        assert!(err.contains("escapes"), "{err}");
        assert!(!dir.path().parent().unwrap().join("evil").exists());
    }

    #[test]
    fn refuses_absolute_paths_links_and_devices() {
        use tar::EntryType;
        let manifest = (
            "a-1.0.0/Cargo.toml",
            EntryType::Regular,
            &b"[package]"[..],
            "",
        );
        let hostile = [
            (
                ("/tmp/quarry-absolute", EntryType::Regular, &b"x"[..], ""),
                "escapes",
            ),
            (
                (
                    "a-1.0.0/passwd",
                    EntryType::Symlink,
                    &b""[..],
                    "/etc/passwd",
                ),
                "Symlink",
            ),
            (
                ("a-1.0.0/up", EntryType::Symlink, &b""[..], "../../.."),
                "Symlink",
            ),
            (
                ("a-1.0.0/shadow", EntryType::Link, &b""[..], "/etc/shadow"),
                "Link",
            ),
            (("a-1.0.0/null", EntryType::Char, &b""[..], ""), "Char"),
            (("a-1.0.0/disk", EntryType::Block, &b""[..], ""), "Block"),
            (("a-1.0.0/pipe", EntryType::Fifo, &b""[..], ""), "Fifo"),
        ];
        for (entry, expected) in hostile {
            let dir = tempfile::tempdir().unwrap();
            let err = unpack(&archive_of(&[manifest, entry]), dir.path(), "a-1.0.0").unwrap_err();
            assert!(err.contains(entry.0), "{err}");
            assert!(err.contains(expected), "{err}");
            let unpacked = dir.path().join(entry.0.trim_start_matches('/'));
            assert!(
                unpacked.symlink_metadata().is_err(),
                "{} was created",
                entry.0
            );
        }
        assert!(!Path::new("/tmp/quarry-absolute").exists());
    }

    #[test]
    fn executables_stay_executable_and_nothing_is_left_unremovable_or_writable_by_others() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, mode) in [
            ("a-1.0.0/Cargo.toml", tar::EntryType::Regular, 0o666),
            ("a-1.0.0/configure", tar::EntryType::Regular, 0o777),
            ("a-1.0.0/locked", tar::EntryType::Directory, 0o555),
            ("a-1.0.0/locked/file", tar::EntryType::Regular, 0o444),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(0);
            header.set_mode(mode);
            header.set_path(path).unwrap();
            header.set_cksum();
            builder.append(&header, &[][..]).unwrap();
        }
        let bytes = builder.into_inner().unwrap().finish().unwrap();
        let root = unpack(&bytes, dir.path(), "a-1.0.0").unwrap().root;
        let mode = |path: &str| root.join(path).metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("Cargo.toml"), 0o644);
        assert_eq!(mode("configure"), 0o755);
        assert_eq!(mode("locked"), 0o755);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_path_named_twice_keeps_its_last_copy_and_a_file_is_never_gone_through() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(&[
            ("a-1.0.0/Cargo.toml", b"[package]"),
            ("a-1.0.0/src/lib.rs", b"first"),
            ("a-1.0.0/src/lib.rs", b"second"),
        ]);
        let unpacked = unpack(&bytes, dir.path(), "a-1.0.0").unwrap();
        let lib = unpacked.root.join("src/lib.rs");
        assert_eq!(std::fs::read_to_string(lib).unwrap(), "second");

        for hostile in [
            // A file, then something below it.
            &[
                ("a-1.0.0/Cargo.toml", &b"[package]"[..]),
                ("a-1.0.0/f", b"x"),
                ("a-1.0.0/f/g", b"y"),
            ][..],
            // A directory, then a file of its name.
            &[
                ("a-1.0.0/Cargo.toml", &b"[package]"[..]),
                ("a-1.0.0/d/g", b"y"),
                ("a-1.0.0/d", b"x"),
            ][..],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let err = unpack(&archive(hostile), dir.path(), "a-1.0.0").unwrap_err();
            assert!(err.contains("cannot unpack"), "{err}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(b"not gzip at all", dir.path(), "a-1.0.0").is_err());
    }
}
