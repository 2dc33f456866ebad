//! The toolchains a consumer's jobs build with, and where each is found: in the consumer's own
//! rustup home (what its machine or image has), or among those it installs itself the first
//! time a job needs one: a channel or date with rustup from the configured dist server, or a
//! toolchain file uploaded with the run (downloaded from S3, checked against its checksum,
//! unpacked and registered with `rustup toolchain link`).
//!
//! Installed on demand, they live in a directory of their own:
//! - `rustup/`: a rustup home (their jobs' `RUSTUP_HOME`), read-only inside the sandbox;
//! - `files/<sha256>/`: unpacked toolchain files, linked from `rustup/toolchains/quarry-file-*`;
//! - `locks/<name>`: one lock file per toolchain, held shared by every job using it and
//!   exclusively while it is installed or removed. Its modification time is when it was last
//!   used (what least-recently-used removal orders by) and it holds the toolchain's sysroot;
//! - `downloads/`: toolchain files being downloaded.
//!
//! Consumers may share the directory (a volume): the lock files are what keeps it consistent, so
//! two consumers never install the same toolchain at once, and none removes one another uses.
//! Within one consumer, slots asking for the same toolchain wait for one install.
//!
//! A toolchain's identity is what its `rustc -vV` says (commit hash and date): memoization keys
//! on it and each result records it, so `nightly` today and `nightly` tomorrow never share.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quarry_core::job::{Toolchain, ToolchainFile};
use quarry_infra::config::ToolchainsConfig;
use quarry_infra::s3::Bucket;

use crate::sandbox::{Mounts, Sandbox};

/// How long a toolchain that could not be had (a dist server or S3 unreachable) is not tried
/// again: its jobs fail at once meanwhile, and go back to the queue with the usual backoff.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Components of a dist tarball not installed: the standard library's HTML documentation is
/// most of a toolchain's size and no experiment reads it.
const SKIPPED_COMPONENTS: [&str; 1] = ["rust-docs"];

/// A toolchain ready on this consumer: the job's toolchain (with its variants), where rustup
/// finds it, and its exact build.
#[derive(Debug, Clone)]
pub struct Installed {
    pub toolchain: Toolchain,
    /// What `cargo +<name>` and `RUSTUP_TOOLCHAIN` name it.
    pub rustup_name: String,
    /// The rustup home it is in (`RUSTUP_HOME`).
    pub home: PathBuf,
    /// `rustc -vV`: the identity results are memoized on and recorded with.
    pub build: String,
    /// Installed by this consumer (or another sharing its directory), not one it came with.
    pub on_demand: bool,
}

impl Installed {
    /// The build in one line (`rustc 1.95.0 (59807616e 2026-04-14)`), for logs.
    pub fn release(&self) -> &str {
        self.build.lines().next().unwrap_or_default()
    }
}

/// A toolchain in use by a job: while it lives, no consumer removes the toolchain.
pub struct Leased {
    pub installed: Installed,
    /// The shared lock on the toolchain's lock file (on-demand toolchains only).
    _in_use: Option<File>,
}

/// Why a toolchain cannot be had, and until when that is believed.
#[derive(Debug, Clone)]
struct Failed {
    why: String,
    /// `None`: for good (the same file always fails the same way).
    until: Option<Instant>,
}

type Cell = Arc<tokio::sync::Mutex<Option<Result<Installed, Failed>>>>;

/// What a job asks for, and where it comes from.
enum Source<'a> {
    /// A channel, date or version rustup knows (`stable`, `nightly-2026-11-30`, `1.95.0`).
    Channel,
    File(&'a ToolchainFile),
}

pub struct Toolchains {
    /// The consumer's own rustup home.
    base_home: PathBuf,
    /// `PATH` for rustup and rustc (the rustup proxies on it).
    path: String,
    dir: PathBuf,
    config: ToolchainsConfig,
    bucket: Bucket,
    /// Where a toolchain's `rustc` is asked who it is: a toolchain file is somebody's build,
    /// so it runs nowhere but in the sandbox, as the packages' code does.
    sandbox: Sandbox,
    /// By rustup name and variants.
    cells: std::sync::Mutex<HashMap<String, Cell>>,
    /// Toolchains installed by this consumer (its metric).
    installs: prometheus::IntCounter,
}

impl Toolchains {
    /// Where the toolchains installed on demand go, for a consumer of `work_dir`.
    pub fn dir_of(config: &ToolchainsConfig, work_dir: &Path) -> std::io::Result<PathBuf> {
        std::path::absolute(
            config
                .dir
                .clone()
                .unwrap_or_else(|| work_dir.join("toolchains")),
        )
    }

    /// `dir` is [`Toolchains::dir_of`]; `sandbox` shows it and `base_home` read-only.
    pub fn new(
        (base_home, dir): (PathBuf, PathBuf),
        path: String,
        config: &ToolchainsConfig,
        (bucket, sandbox): (Bucket, Sandbox),
        installs: prometheus::IntCounter,
    ) -> anyhow::Result<Toolchains> {
        for sub in ["rustup", "files", "locks", "downloads"] {
            let sub = dir.join(sub);
            std::fs::create_dir_all(&sub).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the toolchains directory {}: {e}",
                    sub.display()
                )
            })?;
        }
        Ok(Toolchains {
            base_home,
            path,
            dir,
            config: config.clone(),
            bucket,
            sandbox,
            cells: Default::default(),
            installs,
        })
    }

    /// The toolchains this consumer has found ready, as the fleet table shows them
    /// (`stable: rustc 1.95.0 (...)`, on-demand ones marked).
    pub fn known(&self) -> Vec<String> {
        let cells: Vec<(String, Cell)> = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut known: Vec<String> = cells
            .iter()
            .filter_map(|(_, cell)| {
                let state = cell.try_lock().ok()?;
                let installed = state.as_ref()?.as_ref().ok()?;
                Some(format!(
                    "{}: {}{}",
                    installed.toolchain,
                    installed.release(),
                    if installed.on_demand {
                        " (installed on demand)"
                    } else {
                        ""
                    }
                ))
            })
            .collect();
        known.sort();
        known
    }

    /// The toolchain for a job, installed first if this consumer lacks it; kept from removal
    /// while the lease lives. `file` is the toolchain's file, if the run gave it as one. `Err`
    /// says why it cannot be had.
    pub async fn lease(
        &self,
        toolchain: &Toolchain,
        file: Option<&ToolchainFile>,
    ) -> Result<Leased, String> {
        let (rustup_name, source) = match file {
            Some(file) => (file.rustup_name(), Source::File(file)),
            None => (toolchain.name().to_owned(), Source::Channel),
        };
        let variants = toolchain
            .as_str()
            .strip_prefix(toolchain.name())
            .unwrap_or_default();
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{rustup_name}{variants}"))
            .or_default()
            .clone();
        // Slots asking for the same toolchain wait here for the one that installs it.
        let mut state = cell.lock().await;
        match &*state {
            Some(Ok(installed)) if !installed.on_demand => {
                return Ok(Leased {
                    installed: installed.clone(),
                    _in_use: None,
                });
            }
            Some(Ok(installed)) => {
                // Another consumer sharing the directory may have removed it since.
                if let Some(lock) = self.take_in_use(&rustup_name).await? {
                    return Ok(Leased {
                        installed: installed.clone(),
                        _in_use: Some(lock),
                    });
                }
            }
            Some(Err(failed)) if failed.until.is_none_or(|until| Instant::now() < until) => {
                return Err(failed.why.clone());
            }
            _ => {}
        }
        let found = self.find_or_install(toolchain, &rustup_name, source).await;
        match &found {
            Ok(installed) => tracing::info!(
                %toolchain,
                build = %installed.release(),
                on_demand = installed.on_demand,
                "toolchain ready"
            ),
            Err(failed) => tracing::error!(%toolchain, why = %failed.why, "toolchain unusable"),
        }
        *state = Some(found.clone());
        let installed = found.map_err(|failed| failed.why)?;
        let in_use = if installed.on_demand {
            Some(self.take_in_use(&rustup_name).await?.ok_or_else(|| {
                format!("toolchain {toolchain} was removed as soon as it was installed")
            })?)
        } else {
            None
        };
        Ok(Leased {
            installed,
            _in_use: in_use,
        })
    }

    async fn find_or_install(
        &self,
        toolchain: &Toolchain,
        rustup_name: &str,
        source: Source<'_>,
    ) -> Result<Installed, Failed> {
        let transient = |why: String| Failed {
            why,
            until: Some(Instant::now() + RETRY_AFTER),
        };
        let target = toolchain.target();
        if let Source::Channel = source {
            // The consumer's own, if it has it: then also for a target it lacks the standard
            // library of (its rustup home is not the consumer's to change), which is an error.
            match self.probe(&self.base_home, rustup_name, None).await {
                Ok(_) => {
                    return self
                        .probe(&self.base_home, rustup_name, target)
                        .await
                        .map(|build| self.installed(toolchain, rustup_name, &self.base_home, build))
                        .map_err(transient);
                }
                Err(why) if !self.config.on_demand => return Err(transient(why)),
                Err(_) => {}
            }
        }
        let home = self.dir.join("rustup");
        let lock = self.lock_file(rustup_name).map_err(transient)?;
        let lock = exclusively(lock).await.map_err(transient)?;
        let found = match self.probe(&home, rustup_name, None).await {
            Ok(_) => Ok(false),
            Err(_) => match source {
                Source::Channel => self
                    .rustup_install(rustup_name, target)
                    .await
                    .map(|()| true),
                Source::File(file) => self.install_file(file).await.map(|()| true),
            },
        };
        let installed_now = found?;
        let mut build = self.probe(&home, rustup_name, target).await;
        if let (Err(_), Some(target), Source::Channel) = (&build, target, &source) {
            // Installed before, without this target's standard library.
            self.rustup(
                &["target", "add", "--toolchain", rustup_name, target],
                "add the target",
            )
            .await
            .map_err(transient)?;
            build = self.probe(&home, rustup_name, Some(target)).await;
        }
        let build = build.map_err(transient)?;
        let sysroot = self.sysroot(&home, rustup_name).await.map_err(transient)?;
        // The lock file says where the toolchain is, for removal by whichever consumer.
        std::fs::write(
            self.dir.join("locks").join(rustup_name),
            sysroot.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| transient(format!("cannot write the toolchain's lock file: {e}")))?;
        drop(lock);
        if installed_now {
            self.installs.inc();
            self.remove_least_recently_used(rustup_name).await;
        }
        Ok(self.installed(toolchain, rustup_name, &home, build))
    }

    fn installed(
        &self,
        toolchain: &Toolchain,
        name: &str,
        home: &Path,
        build: String,
    ) -> Installed {
        Installed {
            toolchain: toolchain.clone(),
            rustup_name: name.to_owned(),
            home: home.to_owned(),
            build,
            on_demand: home != self.base_home,
        }
    }

    /// `rustup toolchain install`, from the configured dist server.
    async fn rustup_install(&self, name: &str, target: Option<&str>) -> Result<(), Failed> {
        let mut args = vec![
            "toolchain",
            "install",
            name,
            "--profile",
            "minimal",
            "--no-self-update",
        ];
        if let Some(target) = target {
            args.extend(["--target", target]);
        }
        tracing::info!(toolchain = name, dist_server = %self.config.dist_server, "installing a toolchain with rustup");
        let doing = format!("install it from {}", self.config.dist_server);
        self.rustup(&args, &doing).await.map_err(|why| Failed {
            why,
            until: Some(Instant::now() + RETRY_AFTER),
        })
    }

    /// Runs rustup on the on-demand rustup home; `Err` holds what it said.
    async fn rustup(&self, args: &[&str], doing: &str) -> Result<(), String> {
        let home = self.dir.join("rustup");
        let mut command = tokio::process::Command::new("rustup");
        command
            .args(args)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.dir)
            .env("RUSTUP_HOME", &home)
            .env("CARGO_HOME", self.dir.join("cargo-home"))
            .env("RUSTUP_DIST_SERVER", &self.config.dist_server)
            .env("RUSTUP_AUTO_INSTALL", "0")
            .env("RUSTUP_TERM_COLOR", "never")
            .kill_on_drop(true);
        let limit = Duration::from_secs(self.config.install_timeout_secs);
        let output = match tokio::time::timeout(limit, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(err)) => return Err(format!("cannot run rustup to {doing}: {err}")),
            Err(_) => {
                return Err(format!(
                    "rustup did not {doing} within {} s (consumer.toolchains.install_timeout_secs)",
                    limit.as_secs()
                ));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "rustup could not {doing} (rustup {}): {}",
            args.join(" "),
            last_lines(&String::from_utf8_lossy(&output.stderr), 6)
        ))
    }

    /// Downloads a toolchain file from S3, checks it, unpacks it under `files/` and links it.
    async fn install_file(&self, file: &ToolchainFile) -> Result<(), Failed> {
        let for_good = |why: String| Failed { why, until: None };
        let transient = |why: String| Failed {
            why,
            until: Some(Instant::now() + RETRY_AFTER),
        };
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let download = self
            .dir
            .join("downloads")
            .join(format!("{}-{nonce}", file.checksum));
        tracing::info!(toolchain = %file.name, key = %file.key, bytes = file.bytes, "downloading a toolchain file");
        let got = self.bucket.get_to_file(&file.key, &download).await;
        let removed_download = removed_on_drop(&download);
        let checksum = match got {
            Ok(Some(checksum)) => checksum,
            Ok(None) => {
                return Err(for_good(format!(
                    "the toolchain file of {} is gone from s3://{}/{}",
                    file.name,
                    self.bucket.bucket(),
                    file.key
                )));
            }
            Err(err) => {
                return Err(transient(format!(
                    "cannot download the toolchain file of {}: {err:#}",
                    file.name
                )));
            }
        };
        if checksum != file.checksum {
            return Err(for_good(format!(
                "the toolchain file of {} (s3://{}/{}) does not match its checksum: sha256 {checksum}, \
                 the run says {}",
                file.name,
                self.bucket.bucket(),
                file.key,
                file.checksum
            )));
        }
        let files = self.dir.join("files");
        let unpacking = files.join(format!(".unpack-{}-{nonce}", file.checksum));
        let archive = download.clone();
        let into = unpacking.clone();
        let unpacked = tokio::task::spawn_blocking(move || unpack(&archive, &into))
            .await
            .map_err(|e| transient(format!("unpacking panicked: {e}")))?;
        drop(removed_download);
        let removed_unpacking = removed_on_drop(&unpacking);
        let toolchain_dir = unpacked.map_err(|why| {
            for_good(format!(
                "the toolchain file of {} cannot be installed: {why}",
                file.name
            ))
        })?;
        let installed_dir = files.join(&file.checksum);
        if installed_dir.exists() {
            // Left by an install cut short: the link was never made, or was removed.
            std::fs::remove_dir_all(&installed_dir).map_err(|e| {
                transient(format!("cannot remove {}: {e}", installed_dir.display()))
            })?;
        }
        std::fs::rename(&toolchain_dir, &installed_dir)
            .map_err(|e| transient(format!("cannot move the unpacked toolchain in place: {e}")))?;
        drop(removed_unpacking);
        let name = file.rustup_name();
        let link = self.dir.join("rustup").join("toolchains").join(&name);
        if link.symlink_metadata().is_ok() {
            let _ = std::fs::remove_file(&link);
        }
        let installed = installed_dir.display().to_string();
        self.rustup(
            &["toolchain", "link", &name, &installed],
            "link the toolchain",
        )
        .await
        .map_err(transient)
    }

    /// The toolchain's lock file, created if need be.
    fn lock_file(&self, name: &str) -> Result<File, String> {
        let path = self.dir.join("locks").join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                format!(
                    "cannot open the toolchain lock file {}: {e}",
                    path.display()
                )
            })
    }

    /// A shared lock on an on-demand toolchain, if it is still there; marks it used now.
    async fn take_in_use(&self, name: &str) -> Result<Option<File>, String> {
        let lock = self.lock_file(name)?;
        let lock = tokio::task::spawn_blocking(move || lock.lock_shared().map(|()| lock))
            .await
            .map_err(|e| format!("locking panicked: {e}"))?
            .map_err(|e| format!("cannot lock the toolchain {name}: {e}"))?;
        // The lock file says where the toolchain is once it is installed.
        let present = std::fs::read_to_string(self.dir.join("locks").join(name))
            .is_ok_and(|sysroot| !sysroot.is_empty() && Path::new(&sysroot).is_dir());
        if !present {
            return Ok(None);
        }
        let _ = lock.set_modified(SystemTime::now());
        Ok(Some(lock))
    }

    /// Keeps the on-demand toolchains within `limit_mb`: removes the least recently used ones
    /// that no job of any consumer sharing the directory is using, never `keep`.
    async fn remove_least_recently_used(&self, keep: &str) {
        let dir = self.dir.clone();
        let limit = self.config.limit_mb.saturating_mul(1 << 20);
        let keep = keep.to_owned();
        let removable = tokio::task::spawn_blocking(move || {
            let mut toolchains = on_demand_toolchains(&dir);
            let mut total: u64 = toolchains.iter().map(|t| t.bytes).sum();
            toolchains.sort_by_key(|t| t.used);
            let mut chosen = Vec::new();
            for toolchain in toolchains {
                if total <= limit {
                    break;
                }
                if toolchain.name == keep {
                    continue;
                }
                // Held shared by a job using it, here or in another consumer.
                let Ok(lock) = File::options()
                    .write(true)
                    .open(dir.join("locks").join(&toolchain.name))
                else {
                    continue;
                };
                if lock.try_lock().is_err() {
                    continue;
                }
                total = total.saturating_sub(toolchain.bytes);
                chosen.push((toolchain, lock));
            }
            if total > limit {
                tracing::warn!(
                    kept_mib = total >> 20,
                    limit_mib = limit >> 20,
                    "the toolchains in use are over consumer.toolchains.limit_mb"
                );
            }
            chosen
        })
        .await
        .unwrap_or_default();
        for (toolchain, lock) in removable {
            let removed = self
                .rustup(
                    &["toolchain", "uninstall", &toolchain.name],
                    "remove the toolchain",
                )
                .await;
            // A linked file's unpacked directory is Quarry's to remove.
            if toolchain.sysroot.starts_with(self.dir.join("files")) {
                let _ = std::fs::remove_dir_all(&toolchain.sysroot);
            }
            match removed {
                Ok(()) => {
                    tracing::info!(toolchain = %toolchain.name, mib = toolchain.bytes >> 20, "removed the least recently used toolchain")
                }
                Err(why) => {
                    tracing::warn!(toolchain = %toolchain.name, %why, "cannot remove a toolchain")
                }
            }
            drop(lock);
        }
    }

    /// A toolchain's `rustc -vV` in `home`, and for a `+target=` variant whether that target's
    /// standard library is there: `Err` says why it cannot be used.
    async fn probe(&self, home: &Path, name: &str, target: Option<&str>) -> Result<String, String> {
        let build = self.rustc(home, name, &["-vV"]).await?;
        if let Some(target) = target {
            let libdir = self
                .rustc(
                    home,
                    name,
                    &["--print", "target-libdir", "--target", target],
                )
                .await?;
            if !Path::new(&libdir).is_dir() {
                return Err(format!(
                    "toolchain {name} has no standard library for the target {target} on this \
                     consumer (rustup target add --toolchain {name} {target})"
                ));
            }
        }
        Ok(build)
    }

    async fn sysroot(&self, home: &Path, name: &str) -> Result<PathBuf, String> {
        let sysroot = PathBuf::from(self.rustc(home, name, &["--print", "sysroot"]).await?);
        // A linked toolchain's sysroot is its link: where its files are is where it points.
        Ok(std::fs::canonicalize(&sysroot).unwrap_or(sysroot))
    }

    /// Runs the toolchain's `rustc` in the sandbox, with a scratch directory of its own.
    async fn rustc(&self, home: &Path, name: &str, args: &[&str]) -> Result<String, String> {
        let scratch = self
            .dir
            .join("downloads")
            .join(format!("rustc-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        let _removed = removed_on_drop(&scratch);
        let plus = format!("+{name}");
        let mut all = vec![plus.as_str()];
        all.extend(args);
        let mounts = Mounts::only(&scratch);
        let (program, line) = self
            .sandbox
            .command_line(&mounts, &scratch, "rustc", &all, None, false);
        let output = tokio::process::Command::new(program)
            .args(line)
            .current_dir(&scratch)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &scratch)
            .env("RUSTUP_HOME", home)
            // Never the proxy's own install: installs happen here, on purpose, once.
            .env("RUSTUP_AUTO_INSTALL", "0")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .map_err(|_| format!("toolchain {name}: rustc did not answer within 60 s"))?
            .map_err(|e| format!("cannot run rustc: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!(
                "toolchain {name} is not usable on this consumer: {}",
                last_lines(&String::from_utf8_lossy(&output.stderr), 4)
            ))
        }
    }
}

/// An on-demand toolchain on disk, as its lock file records it.
struct OnDisk {
    name: String,
    sysroot: PathBuf,
    bytes: u64,
    used: SystemTime,
}

fn on_demand_toolchains(dir: &Path) -> Vec<OnDisk> {
    let Ok(locks) = dir.join("locks").read_dir() else {
        return Vec::new();
    };
    locks
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let sysroot = PathBuf::from(std::fs::read_to_string(entry.path()).ok()?);
            if sysroot.as_os_str().is_empty() || !sysroot.is_dir() {
                return None;
            }
            let used = entry.metadata().ok()?.modified().ok()?;
            Some(OnDisk {
                bytes: size_of_tree(&sysroot),
                name,
                sysroot,
                used,
            })
        })
        .collect()
}

/// Bytes of the files under `dir` (symbolic links not followed).
fn size_of_tree(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = dir.read_dir() else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Takes an exclusive lock on a toolchain's lock file, waiting for whoever holds it.
async fn exclusively(lock: File) -> Result<File, String> {
    tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .map_err(|e| format!("locking panicked: {e}"))?
        .map_err(|e| format!("cannot lock a toolchain: {e}"))
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].join(" / ")
}

/// Removes a path when dropped (a download or an unpacking left half done).
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn removed_on_drop(path: &Path) -> RemovedOnDrop {
    RemovedOnDrop(path.to_owned())
}

/// Unpacks a toolchain file (a tar archive, gzip- or xz-compressed or not) into `into`, and
/// returns the toolchain's directory there: the archive's own for an installed toolchain packed
/// as is (a `bin/rustc` at its top, or in its one top directory), or one assembled from the
/// components of a rustup dist tarball or CI artifact (a `components` file and each
/// component's `manifest.in`), as its `install.sh` would, without running it.
pub fn unpack(archive: &Path, into: &Path) -> Result<PathBuf, String> {
    let mut file = File::open(archive).map_err(|e| format!("cannot open it: {e}"))?;
    let mut magic = [0u8; 6];
    let read = file
        .read(&mut magic)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let file = File::open(archive).map_err(|e| format!("cannot open it: {e}"))?;
    let reader: Box<dyn std::io::Read> = match &magic[..read] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        ))),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => Box::new(
            liblzma::read::XzDecoder::new_multi_decoder(std::io::BufReader::new(file)),
        ),
        _ => Box::new(std::io::BufReader::new(file)),
    };
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    let entries = tar
        .entries()
        .map_err(|e| format!("not a tar archive (plain, gzip or xz): {e}"))?;
    let mut count = 0u64;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| format!("not a readable tar archive (plain, gzip or xz): {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("an entry has an unreadable path: {e}"))?
            .into_owned();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::GNUSparse => {}
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if !is_plain_relative(&target) {
                    return Err(format!(
                        "{} is a link to {}, outside the toolchain",
                        path.display(),
                        target.display()
                    ));
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                return Err(format!(
                    "{} is of a kind a toolchain has no use for ({other:?})",
                    path.display()
                ));
            }
        }
        let unpacked = entry
            .unpack_in(into)
            .map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        if !unpacked {
            return Err(format!("{} points outside the archive", path.display()));
        }
        count += 1;
    }
    if count == 0 {
        return Err("the archive is empty".to_owned());
    }
    let top = top_directory(into)?;
    let toolchain = if top.join("bin").join("rustc").is_file() {
        top
    } else if top.join("components").is_file() {
        let assembled = into.join(".toolchain");
        assemble(&top, &assembled)?;
        assembled
    } else {
        return Err(
            "neither an installed toolchain (no bin/rustc at its top) nor a rustup dist tarball \
             (no `components` file)"
                .to_owned(),
        );
    };
    for tool in ["rustc", "cargo"] {
        if !toolchain.join("bin").join(tool).is_file() {
            return Err(format!("it has no bin/{tool}"));
        }
    }
    if !toolchain.join("lib").is_dir() {
        return Err("it has no lib directory".to_owned());
    }
    Ok(toolchain)
}

/// The archive's one top directory, or `into` itself when it holds more than one entry.
fn top_directory(into: &Path) -> Result<PathBuf, String> {
    let entries: Vec<_> = into
        .read_dir()
        .map_err(|e| format!("cannot read {}: {e}", into.display()))?
        .flatten()
        .collect();
    match entries.as_slice() {
        [one] if one.path().is_dir() && !one.path().is_symlink() => Ok(one.path()),
        _ => Ok(into.to_owned()),
    }
}

/// Installs a dist tarball's components (all but [`SKIPPED_COMPONENTS`]) into `out`: each
/// file or directory its `manifest.in` lists is moved there.
fn assemble(dist: &Path, out: &Path) -> Result<(), String> {
    let components = std::fs::read_to_string(dist.join("components"))
        .map_err(|e| format!("cannot read its components file: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for component in components.lines().map(str::trim).filter(|c| !c.is_empty()) {
        if SKIPPED_COMPONENTS.iter().any(|s| component.starts_with(s)) {
            continue;
        }
        if !is_plain_relative(Path::new(component)) || component.contains('/') {
            return Err(format!("its components file names {component:?}"));
        }
        let manifest = std::fs::read_to_string(dist.join(component).join("manifest.in"))
            .map_err(|e| format!("cannot read the manifest of component {component}: {e}"))?;
        for line in manifest.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((_, path)) = line
                .split_once(':')
                .filter(|(kind, _)| matches!(*kind, "file" | "dir"))
            else {
                return Err(format!("component {component} lists {line:?}"));
            };
            let path = Path::new(path);
            if !is_plain_relative(path) {
                return Err(format!(
                    "component {component} lists {} outside the toolchain",
                    path.display()
                ));
            }
            let from = dist.join(component).join(path);
            let to = out.join(path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            std::fs::rename(&from, &to).map_err(|e| {
                format!(
                    "component {component}: cannot install {}: {e}",
                    path.display()
                )
            })?;
        }
    }
    Ok(())
}

/// A relative path of plain names only (no `..`, no root).
fn is_plain_relative(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A toolchain of two scripts: a `rustc` that answers `-vV` (with `commit`) and
    /// `--print sysroot`, and a `cargo`. Enough for rustup to link and run it.
    fn fake_toolchain(dir: &Path, commit: &str) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        let rustc = format!(
            "#!/bin/sh\ncase \"$*\" in\n  *-vV*) printf 'rustc 9.9.9 (fake {commit})\\nbinary: rustc\\ncommit-hash: {commit}\\n' ;;\n  *sysroot*) cd \"$(dirname \"$0\")/..\" && pwd ;;\n  *) exit 1 ;;\nesac\n"
        );
        for (tool, text) in [("rustc", rustc.as_str()), ("cargo", "#!/bin/sh\nexit 0\n")] {
            let path = dir.join("bin").join(tool);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// `dir`'s contents as a gzip-compressed tar under the top directory `top`.
    fn pack(dir: &Path, top: &str, out: &Path) {
        let file = File::create(out).unwrap();
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all(top, dir).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }

    fn sha256(path: &Path) -> String {
        use sha2::{Digest as _, Sha256};
        hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
    }

    /// A rustup dist tarball of the fake toolchain: its files split over two components, plus
    /// documentation that is left out.
    fn dist_tarball(root: &Path, out: &Path) {
        let dist = root.join("rust-nightly-x86_64-unknown-linux-gnu");
        fake_toolchain(&dist.join("rustc"), "dist");
        std::fs::create_dir_all(dist.join("cargo/bin")).unwrap();
        std::fs::write(dist.join("rustc/lib/librustc_driver.so"), "").unwrap();
        std::fs::rename(dist.join("rustc/bin/cargo"), dist.join("cargo/bin/cargo")).unwrap();
        std::fs::create_dir_all(dist.join("rust-docs/share/doc/rust/html")).unwrap();
        std::fs::write(
            dist.join("rust-docs/share/doc/rust/html/index.html"),
            "docs",
        )
        .unwrap();
        std::fs::write(
            dist.join("rustc/manifest.in"),
            "file:bin/rustc\nfile:lib/librustc_driver.so\n",
        )
        .unwrap();
        std::fs::write(dist.join("cargo/manifest.in"), "file:bin/cargo\n").unwrap();
        std::fs::write(
            dist.join("rust-docs/manifest.in"),
            "dir:share/doc/rust/html\n",
        )
        .unwrap();
        std::fs::write(dist.join("components"), "rustc\ncargo\nrust-docs\n").unwrap();
        std::fs::write(dist.join("rust-installer-version"), "3\n").unwrap();
        std::fs::write(dist.join("install.sh"), "#!/bin/sh\nexit 1\n").unwrap();
        let file = File::create(out).unwrap();
        let xz = liblzma::write::XzEncoder::new(file, 1);
        let mut tar = tar::Builder::new(xz);
        tar.append_dir_all("rust-nightly-x86_64-unknown-linux-gnu", &dist)
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn a_packed_toolchain_directory_and_a_dist_tarball_unpack_to_a_toolchain() {
        let scratch = tempfile::tempdir().unwrap();
        fake_toolchain(&scratch.path().join("installed"), "packed");
        let packed = scratch.path().join("packed.tar.gz");
        pack(&scratch.path().join("installed"), "rust-custom", &packed);
        let dir = unpack(&packed, &scratch.path().join("a")).unwrap();
        assert!(dir.join("bin/rustc").is_file());
        assert!(
            std::fs::metadata(dir.join("bin/rustc"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111
                != 0,
            "rustc is still executable"
        );

        let dist = scratch.path().join("dist.tar.xz");
        dist_tarball(&scratch.path().join("dist-src"), &dist);
        let dir = unpack(&dist, &scratch.path().join("b")).unwrap();
        assert!(dir.join("bin/rustc").is_file());
        assert!(dir.join("bin/cargo").is_file());
        assert!(
            !dir.join("share/doc").exists(),
            "the HTML docs are left out"
        );
        assert!(!dir.join("install.sh").exists());
    }

    #[test]
    fn what_is_not_a_toolchain_is_refused_with_why() {
        let scratch = tempfile::tempdir().unwrap();
        let not_tar = scratch.path().join("junk.tar.gz");
        {
            let mut gz = flate2::write::GzEncoder::new(
                File::create(&not_tar).unwrap(),
                flate2::Compression::fast(),
            );
            std::io::Write::write_all(&mut gz, &[7u8; 4096]).unwrap();
            gz.finish().unwrap();
        }
        let why = unpack(&not_tar, &scratch.path().join("a")).unwrap_err();
        assert!(why.contains("tar archive"), "{why}");

        // A toolchain without cargo.
        let installed = scratch.path().join("installed");
        fake_toolchain(&installed, "x");
        std::fs::remove_file(installed.join("bin/cargo")).unwrap();
        let packed = scratch.path().join("no-cargo.tar.gz");
        pack(&installed, "t", &packed);
        let why = unpack(&packed, &scratch.path().join("b")).unwrap_err();
        assert_eq!(why, "it has no bin/cargo");

        // A link out of the toolchain.
        let file = File::create(scratch.path().join("link.tar")).unwrap();
        let mut tar = tar::Builder::new(file);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, "t/bin/rustc", "../../../../etc/passwd")
            .unwrap();
        tar.into_inner().unwrap();
        let why = unpack(&scratch.path().join("link.tar"), &scratch.path().join("c")).unwrap_err();
        assert!(why.contains("outside the toolchain"), "{why}");
    }

    /// Toolchains of a real S3 bucket (the test stack's), installed into `dir`.
    async fn toolchains(
        stack: &quarry_testkit::TestStack,
        dir: &Path,
        limit_mb: u64,
    ) -> Toolchains {
        let bucket = Bucket::new(&stack.config.s3).unwrap();
        bucket.ensure_exists().await.unwrap();
        let config = ToolchainsConfig {
            dir: Some(dir.to_owned()),
            limit_mb,
            ..stack.config.consumer.toolchains.clone()
        };
        let own = crate::host::rustup_home().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let sandbox = Sandbox::bubblewrap(vec![own.clone(), dir.to_owned(), cargo_bin()])
            .await
            .unwrap();
        Toolchains::new(
            (own, dir.to_owned()),
            std::env::var("PATH").unwrap(),
            &config,
            (bucket, sandbox),
            prometheus::IntCounter::new("installs", "installs").unwrap(),
        )
        .unwrap()
    }

    fn cargo_bin() -> PathBuf {
        crate::sandbox::find_on_path("cargo")
            .unwrap()
            .parent()
            .unwrap()
            .to_owned()
    }

    /// A fake toolchain uploaded as a run's file, under `name`.
    async fn uploaded(
        stack: &quarry_testkit::TestStack,
        scratch: &Path,
        name: &str,
    ) -> ToolchainFile {
        fake_toolchain(&scratch.join(name), name);
        let packed = scratch.join(format!("{name}.tar.gz"));
        pack(&scratch.join(name), name, &packed);
        let checksum = sha256(&packed);
        let bytes = std::fs::metadata(&packed).unwrap().len();
        let bucket = Bucket::new(&stack.config.s3).unwrap();
        bucket.ensure_exists().await.unwrap();
        let key = bucket
            .put_toolchain(&checksum, &packed, bytes)
            .await
            .unwrap();
        ToolchainFile {
            name: name.to_owned(),
            checksum,
            bytes,
            key,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn two_slots_asking_for_a_new_toolchain_at_once_install_it_once() {
        let stack = quarry_testkit::TestStack::start().await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let file = uploaded(&stack, scratch.path(), "pr-1").await;
        let toolchains = toolchains(&stack, &scratch.path().join("toolchains"), 1024).await;
        let toolchain: Toolchain = "pr-1".parse().unwrap();
        let (a, b) = tokio::join!(
            toolchains.lease(&toolchain, Some(&file)),
            toolchains.lease(&toolchain, Some(&file))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(toolchains.installs.get(), 1);
        assert_eq!(a.installed.build, b.installed.build);
        assert!(
            a.installed.build.contains("commit-hash: pr-1"),
            "{}",
            a.installed.build
        );
        assert_eq!(a.installed.rustup_name, file.rustup_name());
        assert!(a.installed.on_demand);
        // A toolchain of the consumer's own is found where it is, not installed.
        let own = toolchains
            .lease(&quarry_testkit::toolchain(), None)
            .await
            .unwrap();
        assert!(!own.installed.on_demand);
        assert!(
            own.installed.build.contains("commit-hash: "),
            "{}",
            own.installed.build
        );
        assert_eq!(toolchains.installs.get(), 1);
        assert!(
            toolchains.known().iter().any(|t| t.starts_with("pr-1: rustc 9.9.9") && t.ends_with("(installed on demand)")),
            "{:?}",
            toolchains.known()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn past_the_size_limit_the_least_recently_used_unused_toolchain_goes() {
        let stack = quarry_testkit::TestStack::start().await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("toolchains");
        let files = [
            uploaded(&stack, scratch.path(), "a").await,
            uploaded(&stack, scratch.path(), "b").await,
            uploaded(&stack, scratch.path(), "c").await,
        ];
        // No room at all: only the toolchains in use stay.
        let toolchains = toolchains(&stack, &dir, 0).await;
        let lease = |i: usize| {
            let toolchain: Toolchain = files[i].name.parse().unwrap();
            let toolchains = &toolchains;
            let file = files[i].clone();
            async move { toolchains.lease(&toolchain, Some(&file)).await.unwrap() }
        };
        let present = |i: usize| dir.join("files").join(&files[i].checksum).is_dir();
        let a = lease(0).await;
        let b = lease(1).await;
        assert!(present(0), "a is in use: kept");
        assert!(present(1));
        drop(a);
        drop(b);
        let _c = lease(2).await;
        assert!(!present(0), "a was unused and least recently used: removed");
        assert!(!present(1), "b too: there is no room");
        assert!(present(2));
        // Removed, it is installed again when a job needs it.
        let again = lease(0).await;
        assert!(present(0));
        assert_eq!(toolchains.installs.get(), 4);
        assert!(again.installed.build.contains("commit-hash: a"));
    }
}
