//! Unpacking a `.crate` (a gzipped tar) into a job's scratch directory, refusing what a package
//! archive has no business containing: links, devices, paths that escape the directory, and
//! archives that expand past the size or entry limits, and anything outside the package's own
//! `<name>-<version>/` directory (cargo refuses those too), which would land above the package,
//! where cargo looks for configuration.
//!
//! Files keep their executable bits (a build script may run a shipped `configure`), as cargo
//! keeps them, but nothing is writable by others than the consumer's user, and every
//! directory is one that user can empty, so that what is unpacked can always be removed.

use std::path::{Component, Path, PathBuf};

const MAX_ENTRIES: usize = 100_000;
const MAX_UNPACKED_BYTES: u64 = 1 << 30;

/// Unpacks `archive` into `into` and returns the package's root (`<into>/<name>-<version>`).
pub fn unpack(archive: &[u8], into: &Path, expected_root: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    tar.set_preserve_permissions(false);
    tar.set_mask(0o022);
    tar.set_unpack_xattrs(false);
    let mut total: u64 = 0;
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
        total = total.saturating_add(entry.header().size().unwrap_or(u64::MAX));
        if total > MAX_UNPACKED_BYTES {
            return Err(format!(
                "archive expands past {} MiB",
                MAX_UNPACKED_BYTES >> 20
            ));
        }
        entry
            .unpack_in(into)
            .map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        if kind.is_dir() {
            use std::os::unix::fs::PermissionsExt as _;
            let dir = into.join(&path);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        }
    }
    let root = into.join(expected_root);
    if !root.join("Cargo.toml").is_file() {
        return Err(format!(
            "archive has no {expected_root}/Cargo.toml at its top"
        ));
    }
    Ok(root)
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
        let root = unpack(&bytes, dir.path(), "a-1.0.0").unwrap();
        assert!(root.join("src/lib.rs").is_file());
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
        let root = unpack(&bytes, dir.path(), "a-1.0.0").unwrap();
        let mode = |path: &str| root.join(path).metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("Cargo.toml"), 0o644);
        assert_eq!(mode("configure"), 0o755);
        assert_eq!(mode("locked"), 0o755);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(b"not gzip at all", dir.path(), "a-1.0.0").is_err());
    }
}
