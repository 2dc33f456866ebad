//! What this host offers a job's steps, found once at start: the sandbox, the cgroups, the
//! Landlock confinement that lets slots keep their target directories, the store of sources,
//! and a jobs directory the trust boundary can hold in. A host that can no longer set up any
//! step stops its consumer (`Worker::cannot_set_up_steps`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use quarry_infra::Config;

use crate::{CargoEnv, Metrics, Sandbox, Worker, cgroup, experiment, gateway, sandbox, sources};

impl Worker {
    /// After a job's steps could not be set up (`why`): whether this consumer can set up any
    /// step at all (a scratch directory, the sandbox, a cgroup). If it cannot, it stops taking
    /// jobs and says why, rather than failing every job of the queue as an `error`; its run
    /// ends with that error, so a supervisor sees it.
    pub(crate) async fn cannot_set_up_steps(&self, why: &str) -> bool {
        if self.broken_why().is_some() {
            return true;
        }
        let Err(check) = experiment::check_host(&self.cargo, &self.jobs_dir).await else {
            return false;
        };
        let why = format!(
            "this consumer can no longer set up a job's steps ({why}; a check step failed too: \
             {check}): it stops taking jobs"
        );
        tracing::error!(consumer = %self.name, %why, "stopping");
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.stopping.cancel();
        true
    }

    pub(crate) fn broken_why(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The environment of the consumer's cargo steps: the toolchains (its own rustup home and those
/// installed on demand, read-only), the sandbox and the cgroups its steps run in (`owner` names
/// the consumer's own). Each job has a cargo home of its own (`prepare::write_cargo_home`).
pub(crate) async fn prepare_cargo_env(
    config: &Config,
    owner: &str,
    toolchains: [&PathBuf; 2],
    path: String,
) -> anyhow::Result<CargoEnv> {
    let mut sandbox = if config.consumer.unsandboxed {
        tracing::warn!(
            "RUNNING UNSANDBOXED: packages' build scripts and tests run with this consumer's \
             privileges, network and files"
        );
        Sandbox::Unsandboxed
    } else {
        // The toolchains and cargo's rustup proxy, read-only.
        let cargo_bin = sandbox::find_on_path("cargo")
            .and_then(|cargo| cargo.parent().map(PathBuf::from))
            .context("cargo is not on PATH")?;
        // Those installed on demand too: the directory must exist to be mounted.
        std::fs::create_dir_all(toolchains[1])
            .with_context(|| format!("cannot create {}", toolchains[1].display()))?;
        let mut read_only: Vec<PathBuf> = toolchains.into_iter().cloned().collect();
        read_only.push(cargo_bin);
        let mut sandbox = Sandbox::bubblewrap(read_only).await?;
        sandbox.hide(&config.secret_files());
        sandbox
    };
    let cgroups = match cgroup::Cgroups::detect(owner) {
        Ok(cgroups) => {
            tracing::info!(
                cgroups = %cgroups.describe(),
                "each experiment step gets its own cgroup: memory and processes limited for \
                 its whole process tree"
            );
            Some(cgroups)
        }
        Err(why) if sandbox.limits_tasks() => {
            tracing::warn!(
                %why,
                "no cgroups: memory is limited per process (address space), processes per step \
                 (RLIMIT_NPROC in its sandbox)"
            );
            None
        }
        Err(why) => {
            tracing::warn!(
                %why,
                "no cgroups: memory is limited per process (address space), processes are not \
                 (unsandboxed, or no prlimit)"
            );
            None
        }
    };
    if cgroups.is_none() && !matches!(sandbox, Sandbox::Unsandboxed) {
        match confine_program() {
            Ok(reaper) => {
                tracing::info!(
                    reaper = %reaper.display(),
                    "no cgroups: what each step's processes used is counted by its first \
                     process in the sandbox (CPU time; memory as the largest process's)"
                );
                sandbox.reap_with(reaper);
            }
            Err(why) => tracing::warn!(
                %why,
                "no cgroups: what the steps use (CPU time, memory) is not counted"
            ),
        }
    }
    let confine = if config.consumer.shared_target_mb == 0 {
        None
    } else {
        match confine_here(&sandbox).await {
            Ok(confine) => {
                tracing::info!(
                    confine = %confine.display(),
                    "slots keep their target directories across jobs: build scripts and rustc \
                     confined with Landlock"
                );
                Some(confine)
            }
            Err(why) => {
                tracing::warn!(
                    %why,
                    "every job builds its dependencies from nothing: no target directory is kept \
                     across jobs"
                );
                None
            }
        }
    };
    Ok(CargoEnv {
        path,
        log_limit_bytes: config.consumer.log_limit_bytes,
        task_limit: config.consumer.task_limit,
        sandbox,
        cgroups,
        confine,
        sources: None,
        units: None,
        target_info: Default::default(),
    })
}

/// The pool of compiled units (`units.rs`) that this consumer's jobs share with every consumer on
/// its work directory: only where slots keep target directories (so rustc and build scripts are
/// confined) and sources are stored (only units from the store are pooled).
pub(crate) fn open_units(
    config: &Config,
    cargo: &CargoEnv,
) -> anyhow::Result<Option<crate::units::Pool>> {
    if config.consumer.unit_pool_mb == 0 || cargo.confine.is_none() || cargo.sources.is_none() {
        return Ok(None);
    }
    let dir = std::path::absolute(config.consumer.work_dir.join("units"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    spread_trees(&dir);
    tracing::info!(
        dir = %dir.display(),
        "jobs reuse the compiled dependencies of every consumer on this work directory"
    );
    Ok(Some(crate::units::Pool::new(
        dir,
        config.consumer.unit_pool_mb.saturating_mul(1 << 20),
    )))
}

/// Raises this process's limit of open files to the most it may have: a consumer keeps a lock
/// open on each entry of the store of sources its jobs in hand link (hundreds per job), and
/// the soft limit many hosts start processes with is 1,024.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is no limit.
    let below = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below {
        let before = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(?before, after = ?limit.current, "open files limit raised"),
            Err(err) => tracing::warn!(%err, ?before, "cannot raise the open files limit"),
        }
    }
}

/// Marks `dir` as the top of independent directory trees (`chattr +T`, the ext4 flag for its
/// Orlov allocator) where the filesystem takes the hint: each directory made in `dir` (a job's
/// scratch directory, an entry of the store of sources or of the pool, a slot's target) is then
/// placed in a group of inodes of its own, chosen over the whole disk, rather than packed beside
/// `dir` with all the others.
///
/// Why it matters: on ext4 without a journal, creating a file scans every free inode of its group
/// that was freed in the last minutes (`recently_deleted`, a lookup each) before it takes one. A
/// consumer removes each job's scratch directory, thousands of inodes, and keeps creating files;
/// packed in one group, every file a job or the store creates paid for the scratch
/// directories removed before it (measured: BENCHMARKS.md). Elsewhere the flag only moves where
/// new directories go; a filesystem without it (tmpfs, XFS, overlayfs) refuses it, which
/// changes nothing.
pub(crate) fn spread_trees(dir: &std::path::Path) {
    use rustix::fs::IFlags;
    let marked = std::fs::File::open(dir).and_then(|dir| {
        let flags = rustix::fs::ioctl_getflags(&dir)?;
        if !flags.contains(IFlags::TOPDIR) {
            rustix::fs::ioctl_setflags(&dir, flags | IFlags::TOPDIR)?;
        }
        Ok(())
    });
    if let Err(err) = marked {
        tracing::debug!(dir = %dir.display(), %err, "the filesystem takes no top-directory hint");
    }
}

/// The store of extracted dependency sources (`sources.rs`) that this consumer's jobs share with
/// every consumer on its work directory: only in the sandbox (unsandboxed, a build script could
/// write it), within `consumer.sources_mb`.
pub(crate) fn open_sources(
    config: &Config,
    name: &str,
    sandbox: &Sandbox,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<sources::Sources>>> {
    if config.consumer.sources_mb == 0 {
        tracing::info!("consumer.sources_mb is 0: every job extracts its dependencies' sources");
        return Ok(None);
    }
    if matches!(sandbox, Sandbox::Unsandboxed) {
        tracing::warn!(
            "unsandboxed: every job extracts its dependencies' sources (a package's code could \
             write a shared copy)"
        );
        return Ok(None);
    }
    // Where a consumer kept a store of its own before stores were shared: nothing reads it now.
    let own = config.consumer.work_dir.join(name).join("sources");
    if own.is_dir() {
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(own);
        });
    }
    raise_open_files_limit();
    let dir = std::path::absolute(config.consumer.work_dir.join("sources"))?;
    let sources = sources::Sources::open(
        dir.clone(),
        config.consumer.sources_mb.saturating_mul(1 << 20),
        metrics,
    )
    .with_context(|| format!("cannot open the store of sources {}", dir.display()))?;
    spread_trees(&dir);
    tracing::info!(
        dir = %dir.display(),
        "dependencies' sources are extracted once and shared read-only by every job of every \
         consumer on this work directory"
    );
    Ok(Some(Arc::new(sources)))
}

/// `quarry-confine`: beside this program (or, for a test binary, one directory up), else on
/// `PATH`.
pub(crate) fn confine_program() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("quarry-confine"))
        .find(|path| path.is_file())
        .or_else(|| sandbox::find_on_path("quarry-confine"))
        .ok_or_else(|| "quarry-confine is not installed beside the consumer nor on PATH".to_owned())
}

/// `quarry-confine` ([`confine_program`]), checked to confine on this machine (`confine.rs`).
async fn confine_here(sandbox: &Sandbox) -> Result<PathBuf, String> {
    if matches!(sandbox, Sandbox::Unsandboxed) {
        return Err("unsandboxed: nothing would hold the package's code to it".to_owned());
    }
    let confine = confine_program()?;
    let probe = tokio::process::Command::new(&confine)
        .arg("probe")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", confine.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "Landlock cannot confine here (Linux 6.2 or later, with Landlock enabled, is needed): \
             {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(confine)
}

/// The consumer's own rustup home: where the toolchains it comes with are.
pub(crate) fn rustup_home() -> anyhow::Result<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .context("cannot find the rustup home: set RUSTUP_HOME")
}

/// Refuses a jobs directory the trust boundary cannot hold in: one whose gateway sockets would
/// not fit a Unix socket's path, or with a cargo configuration above it that the steps would
/// see (cargo reads one in every directory from the package's up). Nothing a job runs can
/// write above its scratch directory; this makes sure nothing else left one there either.
pub(crate) fn check_jobs_dir(jobs_dir: &std::path::Path, sandbox: &Sandbox) -> anyhow::Result<()> {
    // A job's socket: `<jobs dir>/<uuid>.sock`.
    let socket = jobs_dir.join(format!("{}.sock", uuid::Uuid::nil()));
    if socket.as_os_str().len() > gateway::MAX_SOCKET_PATH {
        anyhow::bail!(
            "the jobs directory {} is too long a path for the jobs' registry sockets ({} bytes \
             at most, with a job's name): choose a shorter consumer.work_dir",
            jobs_dir.display(),
            gateway::MAX_SOCKET_PATH
        );
    }
    for dir in jobs_dir.ancestors() {
        for config in [".cargo/config", ".cargo/config.toml"] {
            let config = dir.join(config);
            if config.exists() && sandbox.shows(&config) {
                anyhow::bail!(
                    "{} would be read by cargo in every job (it is above the jobs directory {}): \
                     remove it, or choose a consumer.work_dir outside {}",
                    config.display(),
                    jobs_dir.display(),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_ext4_the_directories_of_independent_trees_are_marked_as_such() {
        use rustix::fs::IFlags;
        const EXT4_SUPER_MAGIC: i64 = 0xEF53;
        let dir = tempfile::tempdir().unwrap();
        let on_ext4 = rustix::fs::statfs(dir.path()).is_ok_and(|fs| fs.f_type == EXT4_SUPER_MAGIC);
        spread_trees(dir.path());
        // Twice: a directory already marked stays as it is.
        spread_trees(dir.path());
        let opened = std::fs::File::open(dir.path()).unwrap();
        let flags = rustix::fs::ioctl_getflags(&opened);
        if on_ext4 {
            assert!(flags.unwrap().contains(IFlags::TOPDIR));
        } else {
            eprintln!("not on ext4: the hint is not asserted");
        }
    }

    #[test]
    fn a_cargo_configuration_above_the_jobs_directory_keeps_the_consumer_from_starting() {
        let root = tempfile::tempdir().unwrap();
        let jobs = root.path().join("work/consumer/jobs");
        std::fs::create_dir_all(&jobs).unwrap();
        check_jobs_dir(&jobs, &Sandbox::Unsandboxed).unwrap();
        std::fs::create_dir_all(root.path().join("work/.cargo")).unwrap();
        std::fs::write(root.path().join("work/.cargo/config.toml"), "[alias]\n").unwrap();
        let err = check_jobs_dir(&jobs, &Sandbox::Unsandboxed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("work/.cargo/config.toml would be read by cargo"),
            "{err}"
        );
        let long = root.path().join("x".repeat(100));
        let err = check_jobs_dir(&long, &Sandbox::Unsandboxed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too long a path"), "{err}");
    }
}
