//! A job's workspace: its scratch directory, the package fetched, unpacked, patched and
//! resolved in it (running none of its code), then its experiment run once a slot is free, and
//! the directory removed (or its package kept, `consumer.keep_packages`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quarry_core::job::{BrokenReason, Job, PackageVersion, Patch, PatchSource, Refusal};

use crate::prepare::Refused;
use crate::toolchains::Installed;
use crate::{
    Execution, FetchError, InfraError, Worker, experiment, fetch, prepare, shared_target, unpack,
};

impl Worker {
    /// Fetches the package and prepares its workspace (unpacked, patched, its dependencies
    /// resolved and downloaded), then, once one of the consumer's experiment slots is free, logs
    /// the attempt's `started` event and runs the experiment's steps that run the package's
    /// code: returns what it came to and how long it ran (resolving included, waiting for the
    /// slot not). Preparing runs none of the package's code, so it happens while other jobs hold
    /// the slots: a slot never waits on a download or a resolution, and a consumer's death is
    /// counted against the jobs whose code was running, not the ones it was preparing. `None`:
    /// the consumer is stopping and the job had not started.
    pub(crate) async fn run_experiment(
        &self,
        job: &Job,
        attempt: u32,
        toolchain: &Installed,
    ) -> Result<Option<(Execution, Duration)>, InfraError> {
        let archive = match self.fetcher.fetch(&job.package).await {
            Ok((bytes, source)) => {
                tracing::debug!(package = %job.package, ?source, "crate fetched");
                bytes
            }
            Err(FetchError::Missing(why)) => return Ok(Some((broken(&why), Duration::ZERO))),
            Err(FetchError::Unavailable(why)) => return Err(InfraError::from(why)),
        };
        let preparing = Instant::now();
        let (scratch, package_dir, resolved) = match self.prepare(job, archive, toolchain).await? {
            Ok(workspace) => workspace,
            Err(ended) => return Ok(Some((ended, preparing.elapsed()))),
        };
        let waiting = Instant::now();
        let slot = tokio::select! {
            // Biased: a stopping consumer starts nothing, even where a slot is free.
            biased;
            () = self.stopping.cancelled() => {
                tracing::info!(job = %job.id, package = %job.package, "stopping before the job started; giving it back");
                return Ok(None);
            }
            slot = self.slots.acquire() => slot,
            () = self.give_way() => {
                tracing::info!(job = %job.id, package = %job.package, "another consumer of the fleet is idle: giving back a job waiting for this consumer's busy slot, for it to take");
                self.metrics.given_way.inc();
                return Ok(None);
            }
        };
        self.store
            .start_attempt(job, attempt as i32, &self.name)
            .await
            .map_err(|e| InfraError::from(format!("cannot record the attempt's start: {e:#}")))?;
        tracing::info!(job = %job.id, package = %job.package, toolchain = %job.toolchain, attempt, "job started");
        let started = Instant::now();
        let slot_wait = started - waiting;
        let resolving = resolved.spent;
        let variant = format!("{} {:?}", job.toolchain, job.experiment.cap_lints);
        let shared_target =
            self.slots
                .target(&slot, job.experiment.mode, &toolchain.rustup_name, &variant);
        let workspace = experiment::Workspace {
            scratch: scratch.path(),
            package_dir: &package_dir,
            shared_target: shared_target.as_deref(),
        };
        let mut execution = experiment::run(
            &self.cargo,
            workspace,
            toolchain,
            resolved,
            self.limits(job),
        )
        .await
        .map_err(|e| InfraError::host(format!("cannot set up or run the job's steps: {e}")))?;
        let ran_for = resolving + started.elapsed();
        if let (Some(target), Some(pool)) = (shared_target.as_deref(), &self.cargo.units) {
            self.units_after_job(target, pool, &mut execution).await;
        }
        // Measured before the slot's next job adds to it.
        let kept = self.slots.after_job(&slot).await;
        if shared_target.is_some() {
            self.metrics.shared_target_observe(kept);
        }
        // The next job's code may start while this one's files are measured and removed.
        drop(slot);
        execution.cost.slot_wait_ms = u64::try_from(slot_wait.as_millis()).unwrap_or(u64::MAX);
        execution.cost.disk_bytes = scratch.disk_used().await + kept.added_bytes;
        scratch.remove_in_background();
        Ok(Some((execution, ran_for)))
    }

    /// Counts what the job reused from the pool of units and added to it (its log says so),
    /// and trims the pool if it may have grown past its limit.
    async fn units_after_job(
        &self,
        target: &Path,
        pool: &crate::units::Pool,
        execution: &mut Execution,
    ) {
        let counts = crate::units::take_counts(target);
        self.metrics.units(counts);
        if counts != crate::units::Counts::default() {
            execution.log.push_str(&format!(
                "quarry: dependencies' compiled units: {} reused from the pool, {} added to it; \
                 build script runs: {} reused, {} added\n",
                counts.reused, counts.added, counts.runs_reused, counts.runs_added
            ));
        }
        if counts.added + counts.runs_added > 0 {
            let pool = pool.clone();
            let added = counts.added_bytes;
            if let Ok((bytes, removed)) =
                tokio::task::spawn_blocking(move || pool.after_adding(added)).await
            {
                self.metrics.unit_pool_trimmed(bytes, removed);
            }
        }
    }

    /// What a job's experiment may use.
    fn limits(&self, job: &Job) -> experiment::Limits {
        experiment::Limits {
            time: Duration::from_secs(job.experiment.timeout_secs),
            memory_bytes: job.experiment.memory_limit_mb.saturating_mul(1 << 20),
            tasks: self.cargo.task_limit,
        }
    }

    /// The job's scratch directory with the package unpacked (and patched) in it and its
    /// dependencies resolved, the package's directory, and the experiment so far; `Err` holds
    /// the job's outcome when the package cannot be unpacked, patched or resolved.
    async fn prepare(
        &self,
        job: &Job,
        archive: bytes::Bytes,
        toolchain: &Installed,
    ) -> Result<Result<(ScratchDir, PathBuf, experiment::Resolved), Execution>, InfraError> {
        let scratch = self.jobs_dir.join(job.id.to_string());
        let keep = self
            .keep_packages
            .as_ref()
            .map(|dir| dir.join(job.id.to_string()));
        let scratch = ScratchDir::create(&scratch, keep)
            .map_err(|e| InfraError::host(format!("cannot create {}: {e}", scratch.display())))?;
        let root = format!("{}-{}", job.package.name, job.package.version);
        let package_dir = match unpack_off_thread(archive, scratch.path().join("src"), root).await?
        {
            Ok(dir) => dir,
            Err(why) => {
                let mut refused = Refused::default();
                refused.add(Refusal::UnpackRefused, why);
                return Ok(Err(Execution::broken(
                    "cannot unpack the package",
                    &refused,
                )));
            }
        };
        // The trust boundary: what the package ships for cargo to obey is removed or refused
        // before cargo reads any of it.
        let mut refused = Refused::default();
        if let Err(why) = prepare::package(scratch.path(), &package_dir, &mut refused) {
            return Ok(Err(
                Execution::broken(&why, &refused).because(BrokenReason::InvalidManifest)
            ));
        }
        if let Some(patch) = &job.patch
            && let Err(not_applied) = self
                .apply_patch(patch, scratch.path(), &package_dir, &mut refused)
                .await
        {
            return not_applied.map(Err);
        }
        if refused.ends_the_job() {
            return Ok(Err(Execution::broken(
                "not resolved: the package needs what Quarry does not fetch",
                &refused,
            )));
        }
        let workspace = experiment::Workspace {
            scratch: scratch.path(),
            package_dir: &package_dir,
            shared_target: None,
        };
        let resolved = experiment::resolve(
            &self.cargo,
            &self.mirror,
            workspace,
            toolchain,
            &job.experiment,
            self.limits(job),
            refused,
        )
        .await
        .map_err(|e| InfraError::host(format!("cannot set up or run the job's steps: {e}")))?;
        Ok(resolved.map(|resolved| (scratch, package_dir, resolved)))
    }

    /// Replaces a dependency of the unpacked package, before anything resolves it: the patch's
    /// `.crate` (through the caches, or as uploaded with the run) is unpacked beside the package,
    /// its manifest checked as the package's is (into `refused`), and named in a
    /// `[patch.crates-io]` table appended to the package's manifest (`cargo package` strips any
    /// the author had). `Err` holds what the job comes to when that cannot be done.
    async fn apply_patch(
        &self,
        patch: &Patch,
        scratch: &std::path::Path,
        package_dir: &std::path::Path,
        refused: &mut Refused,
    ) -> Result<(), Result<Execution, InfraError>> {
        let replacement = PackageVersion {
            name: patch.name.clone(),
            version: patch.version.clone(),
            checksum: patch.checksum.clone(),
        };
        fn not_applied(
            why: String,
            refused: &Refused,
        ) -> Result<(), Result<Execution, InfraError>> {
            Err(Ok(
                Execution::broken(&why, refused).because(BrokenReason::PatchNotApplied)
            ))
        }
        let archive = match &patch.source {
            PatchSource::Registry => match self.fetcher.fetch(&replacement).await {
                Ok((bytes, _)) => bytes,
                Err(FetchError::Missing(why)) => {
                    return not_applied(format!("cannot fetch the patch {patch}: {why}"), refused);
                }
                Err(FetchError::Unavailable(why)) => return Err(Err(InfraError::from(why))),
            },
            PatchSource::Upload { key } => match self.bucket.get_patch(key).await {
                Ok(Some(bytes)) if fetch::checksum_matches(&bytes, &patch.checksum) => bytes,
                Ok(Some(_)) => {
                    return Err(Err(InfraError::from(format!(
                        "the uploaded patch s3://{}/{key} does not match its checksum",
                        self.bucket.bucket()
                    ))));
                }
                Ok(None) => {
                    return not_applied(
                        format!(
                            "the uploaded patch {patch} is gone from s3://{}/{key}",
                            self.bucket.bucket()
                        ),
                        refused,
                    );
                }
                Err(err) => return Err(Err(InfraError::from(format!("{err:#}")))),
            },
        };
        let root = format!("{}-{}", patch.name, patch.version);
        let patch_dir = match unpack_off_thread(archive, scratch.join("patches"), root).await {
            Ok(Ok(dir)) => dir,
            Ok(Err(why)) => {
                refused.add(Refusal::UnpackRefused, format!("the patch {patch}: {why}"));
                return not_applied(format!("cannot unpack the patch {patch}"), refused);
            }
            Err(infra) => return Err(Err(infra)),
        };
        if let Err(why) = prepare::patch(&patch_dir, &patch.to_string(), refused) {
            return not_applied(format!("the patch {patch}: {why}"), refused);
        }
        let manifest = package_dir.join("Cargo.toml");
        let table = format!(
            "\n[patch.crates-io]\n{} = {{ path = {} }}\n",
            toml::Value::String(patch.name.clone()),
            toml::Value::String(patch_dir.display().to_string()),
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&manifest)
            .and_then(|mut file| std::io::Write::write_all(&mut file, table.as_bytes()));
        if let Err(err) = appended {
            return not_applied(
                format!("cannot add the patch to {}: {err}", manifest.display()),
                refused,
            );
        }
        Ok(())
    }
}

/// Unpacks a `.crate` (see [`unpack::unpack`]) on a blocking thread: the package's directory, or
/// why the archive was refused.
async fn unpack_off_thread(
    archive: bytes::Bytes,
    into: PathBuf,
    root: String,
) -> Result<Result<PathBuf, String>, InfraError> {
    tokio::task::spawn_blocking(move || {
        unpack::unpack(&archive, &into, &root).map(|unpacked| unpacked.root)
    })
    .await
    .map_err(|err| InfraError::from(format!("unpacking panicked: {err}")))
}

fn broken(why: &str) -> Execution {
    Execution::broken(why, &Refused::default())
}

/// A job's scratch directory, removed when the job is done with it (whatever happened).
struct ScratchDir(PathBuf, Option<PathBuf>);

/// Scratch directories being removed are first renamed to a name starting with this, so a job
/// that comes back to the same consumer at once gets a fresh directory under its own name.
const REMOVED_SCRATCH: &str = ".removed-";

impl ScratchDir {
    /// A fresh scratch directory at `path`; `keep`, where its unpacked package goes when it is
    /// removed (`consumer.keep_packages`).
    fn create(path: &std::path::Path, keep: Option<PathBuf>) -> std::io::Result<ScratchDir> {
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        std::fs::create_dir_all(path)?;
        Ok(ScratchDir(path.to_owned(), keep))
    }

    /// Moves the unpacked package (as prepared and resolved) to where it is kept, if anywhere.
    fn keep_package(&mut self) {
        let Some(keep) = self.1.take() else {
            return;
        };
        let src = self.0.join("src");
        if !src.exists() {
            return;
        }
        let moved = keep
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                if keep.exists() {
                    std::fs::remove_dir_all(&keep)?;
                }
                std::fs::rename(&src, &keep)
            });
        if let Err(err) = moved {
            tracing::warn!(dir = %keep.display(), %err, "cannot keep the job's package");
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The disk its files take, walked off the runtime's threads.
    async fn disk_used(&self) -> u64 {
        let dir = self.0.clone();
        tokio::task::spawn_blocking(move || shared_target::disk_used(&dir))
            .await
            .unwrap_or(0)
    }

    /// Removes the directory on a blocking thread, without waiting for it: a job's files can be
    /// many, and removing them holds up nothing. Falls back to removing it here when it cannot
    /// be moved aside.
    fn remove_in_background(mut self) {
        self.keep_package();
        let path = std::mem::take(&mut self.0);
        let aside = path.with_file_name(format!(
            "{REMOVED_SCRATCH}{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                tokio::task::spawn_blocking(move || remove_scratch(&aside));
            }
            Err(_) => remove_scratch(&path),
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Empty once removed in the background.
        if !self.0.as_os_str().is_empty() {
            self.keep_package();
            remove_scratch(&self.0);
        }
    }
}

fn remove_scratch(dir: &std::path::Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %err, "cannot remove a scratch directory");
    }
}

/// Removes what a consumer of the same name left in its jobs directory when it died: scratch
/// directories being removed.
pub(crate) fn remove_leftover_scratch(jobs_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Not gateway sockets: a consumer of the same name may still be using them (one left by
        // a consumer that died is an empty file, replaced when its job's name comes again).
        if name.starts_with(REMOVED_SCRATCH) {
            remove_scratch(&entry.path());
        }
    }
}
