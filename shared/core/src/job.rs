//! The domain: a [`Run`] of an [`Experiment`] publishes one [`Job`] per package version and
//! [`Toolchain`]; a consumer turns each job into exactly one [`Outcome`].
//!
//! A `Job` is also the wire format of the work queue (JSON, versioned by [`JOB_FORMAT`]), so every
//! field here is part of the contract between producer and consumer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the job message format; a consumer dead-letters messages of any other version.
pub const JOB_FORMAT: u32 = 1;

/// Namespace for Quarry's deterministic (v5) ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0f_5e2c_9d1b_4c7e_8f3a_2b5d_7e91_c4a8);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    pub fn new() -> Self {
        RunId(Uuid::new_v4())
    }
}

impl Default for RunId {
    fn default() -> Self {
        RunId::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RunId(s.parse()?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// The same run, package version and side (toolchain, and patch if any: see
    /// [`Job::side_label`]) always give the same id, so a re-published or redelivered job can
    /// never become a second job.
    pub fn derive(run: RunId, package: &PackageVersion, side: &str) -> JobId {
        let key = format!("{}/{}@{}/{}", run.0, package.name, package.version, side);
        JobId(Uuid::new_v5(&ID_NAMESPACE, key.as_bytes()))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A rustup toolchain (`stable`, `nightly`, `1.95.0`, `nightly-2026-05-19`, ...), optionally
/// with variants, as Crater writes them: `stable+rustflags=-Dwarnings`, `+cargoflags=...`,
/// `+target=x86_64-unknown-linux-musl`. Two variants of one toolchain are two sides of a run,
/// so a lint made an error can be told from a regression. The whole text is the side's label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Toolchain(String);

/// The variants a toolchain may carry, in the order they are written.
const TOOLCHAIN_VARIANTS: [&str; 3] = ["rustflags", "cargoflags", "target"];

impl Toolchain {
    /// The whole text: the rustup name and its variants.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The rustup toolchain name (`cargo +<name>`).
    pub fn name(&self) -> &str {
        self.0.split('+').next().unwrap_or(&self.0)
    }

    fn variant(&self, key: &str) -> Option<&str> {
        self.0
            .split('+')
            .skip(1)
            .find_map(|v| v.strip_prefix(key)?.strip_prefix('='))
    }

    /// Flags for every rustc the build steps run (`RUSTFLAGS`).
    pub fn rustflags(&self) -> Option<&str> {
        self.variant("rustflags")
    }

    /// Arguments added to each cargo build step (`check`, `build`, `test`, ...).
    pub fn cargoflags(&self) -> Vec<&str> {
        self.variant("cargoflags")
            .map(|flags| flags.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// The target the build steps build for (`--target`).
    pub fn target(&self) -> Option<&str> {
        self.variant("target")
    }
}

impl FromStr for Toolchain {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.split('+');
        let name = parts.next().unwrap_or_default();
        // The name ends up as `cargo +<name>`: refuse anything that could be read as a flag.
        let valid = !name.is_empty()
            && !name.starts_with('-')
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            anyhow::bail!(
                "invalid toolchain name {name:?}: expected a rustup toolchain such as `stable`, \
                 `nightly` or `1.95.0`, optionally with variants (`stable+rustflags=-Dwarnings`)"
            );
        }
        let mut seen = Vec::new();
        for variant in parts {
            let Some((key, value)) = variant.split_once('=') else {
                anyhow::bail!(
                    "invalid toolchain variant {variant:?} in {s:?}: expected key=value, with key \
                     one of {}",
                    TOOLCHAIN_VARIANTS.join(", ")
                );
            };
            if !TOOLCHAIN_VARIANTS.contains(&key) {
                anyhow::bail!(
                    "unknown toolchain variant {key:?} in {s:?}: expected one of {}",
                    TOOLCHAIN_VARIANTS.join(", ")
                );
            }
            if seen.contains(&key) {
                anyhow::bail!("toolchain variant {key:?} given twice in {s:?}");
            }
            seen.push(key);
            anyhow::ensure!(
                !value.trim().is_empty() && !value.chars().any(char::is_control),
                "toolchain variant {key:?} in {s:?} needs a value"
            );
            if key == "target" {
                anyhow::ensure!(
                    value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                    "invalid target {value:?} in {s:?}: expected a target triple"
                );
            }
        }
        anyhow::ensure!(s.len() <= 512, "toolchain {s:?} is too long");
        Ok(Toolchain(s.to_owned()))
    }
}

impl TryFrom<String> for Toolchain {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<Self> {
        s.parse()
    }
}

impl From<Toolchain> for String {
    fn from(t: Toolchain) -> String {
        t.0
    }
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is done to each package, as in Crater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `cargo check`
    Check,
    /// `cargo build`
    Build,
    /// `cargo build`, then `cargo test`
    Test,
    /// `cargo clippy`
    Clippy,
    /// `cargo doc --no-deps`
    Doc,
    /// The experiment's own `command`, run in the sandbox in the unpacked package (exit 0 is
    /// `test-pass`, anything else `test-fail`).
    Command,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Check,
        Mode::Build,
        Mode::Test,
        Mode::Clippy,
        Mode::Doc,
        Mode::Command,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Check => "check",
            Mode::Build => "build",
            Mode::Test => "test",
            Mode::Clippy => "clippy",
            Mode::Doc => "doc",
            Mode::Command => "command",
        }
    }

    /// What it runs, in a line (for a command line's help).
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Check => "`cargo check`",
            Mode::Build => "`cargo build`",
            Mode::Test => "`cargo build`, then `cargo test`",
            Mode::Clippy => "`cargo clippy`",
            Mode::Doc => "`cargo doc --no-deps`",
            Mode::Command => {
                "The experiment's own `command`, run in the sandbox in the unpacked package (exit \
                 0 is `test-pass`, anything else `test-fail`)"
            }
        }
    }
}

impl FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown mode {s:?}"))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every job of a run does, apart from the package and toolchain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experiment {
    pub mode: Mode,
    /// Wall-clock limit for one job's experiment, resolution included.
    pub timeout_secs: u64,
    /// Run every job, even one whose identical twin (same package checksum, toolchain build and
    /// experiment) already has a result in another run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// Memory the experiment may use, in MiB: all its processes together where the consumer has
    /// cgroups (the kernel kills past it), else each process's address space (allocations fail);
    /// either way the job's outcome is `out-of-memory`.
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// For `Mode::Command`: the program and its arguments (no shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The most a lint may be, for the package's own code too (`--cap-lints`, as Crater's
    /// `cap-lints`): with `warn`, a `#![deny(warnings)]` crate does not fail on a lint new in
    /// the end toolchain. `None` leaves lints as the package says (cargo already caps its
    /// dependencies' at `allow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_lints: Option<CapLints>,
}

/// A lint level to cap every lint at (`rustc --cap-lints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapLints {
    Allow,
    Warn,
    Deny,
    Forbid,
}

impl CapLints {
    pub const ALL: [CapLints; 4] = [
        CapLints::Allow,
        CapLints::Warn,
        CapLints::Deny,
        CapLints::Forbid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CapLints::Allow => "allow",
            CapLints::Warn => "warn",
            CapLints::Deny => "deny",
            CapLints::Forbid => "forbid",
        }
    }
}

impl FromStr for CapLints {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        CapLints::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown lint level {s:?}"))
    }
}

impl fmt::Display for CapLints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_memory_limit_mb() -> u64 {
    4096
}

/// One published version of one package, as the index describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PackageVersion {
    pub name: String,
    pub version: String,
    /// Hex sha256 of the `.crate` file, from the index.
    pub checksum: String,
}

impl fmt::Display for PackageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// One unit of work: run `experiment` on `package` with `toolchain`. The queue's message body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub format: u32,
    pub id: JobId,
    pub run_id: RunId,
    pub package: PackageVersion,
    pub toolchain: Toolchain,
    pub experiment: Experiment,
    /// A dependency replaced (through `[patch.crates-io]`) before resolving: the *end* side of a
    /// dependency-patch run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Patch>,
    /// For a *re-run*: the job this one runs again. A package that regressed is run once more
    /// on its failing side before it counts as regressed; the re-run is a job of its own, of the
    /// side `<side> (re-run)`, and never reuses an earlier result. Named `recheck_of` in the
    /// message, as format 1 has always named it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "recheck_of"
    )]
    pub rerun_of: Option<JobId>,
}

/// How a re-run's side is labelled: the side it re-runs, then this.
pub const RECHECK_SUFFIX: &str = " (re-run)";

/// The label of the re-runs of the side labelled `side`.
pub fn rerun_label(side: &str) -> String {
    format!("{side}{RECHECK_SUFFIX}")
}

/// The labels of sides, as the database and the report name them.
pub fn side_labels(sides: &[(Toolchain, Option<Patch>)]) -> Vec<String> {
    sides
        .iter()
        .map(|(toolchain, patch)| Job::side_label(toolchain.as_str(), patch.as_ref()))
        .collect()
}

/// A run's sides, in order (start, then end): one per toolchain, or for a dependency-patch run
/// (one toolchain and a patch) the toolchain without and with the patch.
pub fn run_sides(
    toolchains: &[Toolchain],
    patch: Option<&Patch>,
) -> Vec<(Toolchain, Option<Patch>)> {
    match (patch, toolchains) {
        (Some(patch), [toolchain]) => vec![
            (toolchain.clone(), None),
            (toolchain.clone(), Some(patch.clone())),
        ],
        _ => toolchains.iter().map(|t| (t.clone(), None)).collect(),
    }
}

/// A toolchain given to a run as a file (`--toolchain-file NAME=FILE`): a rustup dist tarball
/// or CI artifact, or an installed toolchain directory packed as a tarball. The producer uploads
/// it to S3 once, by its checksum; each consumer downloads, checks, unpacks and registers it the
/// first time one of its jobs needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolchainFile {
    /// The toolchain's name in the run (`--toolchain NAME`, the side label).
    pub name: String,
    /// Hex sha256 of the file.
    pub checksum: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Where the producer put it.
    pub key: String,
}

impl ToolchainFile {
    /// The name it is registered under with rustup on a consumer (`rustup toolchain link`):
    /// from its content, so two runs' files called `pr-1` never collide, and the same file is
    /// installed once whatever the runs call it.
    pub fn rustup_name(&self) -> String {
        format!(
            "quarry-file-{}",
            &self.checksum[..16.min(self.checksum.len())]
        )
    }
}

/// The toolchain file of `toolchain` (by its name, whatever its variants), if it was given as one.
pub fn toolchain_file<'a>(
    files: &'a [ToolchainFile],
    toolchain: &Toolchain,
) -> Option<&'a ToolchainFile> {
    files.iter().find(|f| f.name == toolchain.name())
}

/// The parts of a run's stored definition that every component reads (the producer stores the
/// whole of it): enough to name the run's sides and to rebuild any of its jobs.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredDefinition {
    pub toolchains: Vec<Toolchain>,
    pub experiment: Experiment,
    #[serde(default)]
    pub patch: Option<Patch>,
    /// The toolchains given as files, by name.
    #[serde(default)]
    pub toolchain_files: Vec<ToolchainFile>,
}

/// A job as the database keeps it (`jobs`: its id, package, side label and the job it re-runs):
/// with its run's definition, enough to rebuild it as it was published
/// ([`StoredDefinition::job`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub id: JobId,
    pub package: PackageVersion,
    pub side: String,
    pub rerun_of: Option<JobId>,
}

impl StoredDefinition {
    pub fn of(definition: &serde_json::Value) -> Result<StoredDefinition, InvalidJob> {
        serde_json::from_value(definition.clone())
            .map_err(|e| InvalidJob(format!("the run's stored definition is unreadable: {e}")))
    }

    pub fn sides(&self) -> Vec<(Toolchain, Option<Patch>)> {
        run_sides(&self.toolchains, self.patch.as_ref())
    }

    /// The sides' labels, as the database and the report name them.
    pub fn side_labels(&self) -> Vec<String> {
        side_labels(&self.sides())
    }

    /// The job of `run` the database keeps as `stored`, exactly as it was published; an error
    /// if it cannot be rebuilt so. The one way a job is rebuilt from a row.
    pub fn job(&self, run: RunId, stored: StoredJob) -> Result<Job, InvalidJob> {
        let StoredJob {
            id,
            package,
            side: label,
            rerun_of,
        } = stored;
        let label = label.as_str();
        let base = match rerun_of {
            Some(_) => label.strip_suffix(RECHECK_SUFFIX).unwrap_or(label),
            None => label,
        };
        let (toolchain, patch) = self
            .sides()
            .into_iter()
            .find(|(t, p)| Job::side_label(t.as_str(), p.as_ref()) == base)
            .ok_or_else(|| {
                InvalidJob(format!(
                    "job {id} is of a side ({label}) its run's definition does not have"
                ))
            })?;
        let mut job = Job::patched(run, package, toolchain, self.experiment.clone(), patch);
        if rerun_of.is_some() {
            job = job.rerun();
        }
        if job.id != id || job.rerun_of != rerun_of {
            return Err(InvalidJob(format!(
                "job {id} does not match its run's definition (was the definition changed by hand?)"
            )));
        }
        Ok(job)
    }
}

/// A dependency replaced by another version of it, from the registry or uploaded with the run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Patch {
    /// The dependency, by its registry name.
    pub name: String,
    /// The replacement's version.
    pub version: String,
    /// Hex sha256 of the replacement's `.crate` file.
    pub checksum: String,
    pub source: PatchSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PatchSource {
    /// A version the registry serves, fetched through the consumers' caches.
    Registry,
    /// A `.crate` (as `cargo package` writes it) uploaded with the run, at this S3 key.
    Upload { key: String },
}

impl fmt::Display for Patch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)?;
        if let PatchSource::Upload { .. } = self.source {
            write!(
                f,
                " (uploaded, sha256 {})",
                &self.checksum[..12.min(self.checksum.len())]
            )?;
        }
        Ok(())
    }
}

impl Job {
    pub fn new(
        run_id: RunId,
        package: PackageVersion,
        toolchain: Toolchain,
        experiment: Experiment,
    ) -> Job {
        Job::patched(run_id, package, toolchain, experiment, None)
    }

    /// A job of one side of a run: its toolchain, and the dependency it patches if any.
    pub fn patched(
        run_id: RunId,
        package: PackageVersion,
        toolchain: Toolchain,
        experiment: Experiment,
        patch: Option<Patch>,
    ) -> Job {
        Job {
            format: JOB_FORMAT,
            id: JobId::derive(
                run_id,
                &package,
                &Job::side_label(toolchain.as_str(), patch.as_ref()),
            ),
            run_id,
            package,
            toolchain,
            experiment,
            patch,
            rerun_of: None,
        }
    }

    /// The job that runs this one again, fresh: the re-run of a regression.
    pub fn rerun(&self) -> Job {
        let mut rerun = Job {
            rerun_of: Some(self.id),
            ..self.clone()
        };
        rerun.id = JobId::derive(self.run_id, &self.package, &rerun.side());
        rerun
    }

    /// How the job's side of the run is named in the database and the report: the toolchain,
    /// followed by the patch when there is one (`1.95.0 with serde@1.0.300`).
    pub fn side_label(toolchain: &str, patch: Option<&Patch>) -> String {
        match patch {
            Some(patch) => format!("{toolchain} with {patch}"),
            None => toolchain.to_owned(),
        }
    }

    /// The job's side, as the database's `side` column and the report name it.
    pub fn side(&self) -> String {
        let label = Job::side_label(self.toolchain.as_str(), self.patch.as_ref());
        match self.rerun_of {
            Some(_) => rerun_label(&label),
            None => label,
        }
    }

    /// Parses a queue message, refusing other format versions and ids that do not match the
    /// job's content (a hand-edited or corrupted message).
    pub fn from_message(body: &[u8]) -> Result<Job, InvalidJob> {
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format: Format = serde_json::from_slice(body)
            .map_err(|e| InvalidJob(format!("not a Quarry job message: {e}")))?;
        if format.format != JOB_FORMAT {
            return Err(InvalidJob(format!(
                "job format {} is not supported (this consumer reads format {JOB_FORMAT})",
                format.format
            )));
        }
        let job: Job =
            serde_json::from_slice(body).map_err(|e| InvalidJob(format!("malformed job: {e}")))?;
        let expected = JobId::derive(job.run_id, &job.package, &job.side());
        // A re-run names the job it re-runs: the same package and side without the suffix.
        let reruns_its_original = job.rerun_of.is_none_or(|of| {
            let original = Job::side_label(job.toolchain.as_str(), job.patch.as_ref());
            of == JobId::derive(job.run_id, &job.package, &original)
        });
        if job.id != expected || !reruns_its_original {
            return Err(InvalidJob(format!(
                "job id {} does not match its content (expected {expected})",
                job.id
            )));
        }
        Ok(job)
    }

    /// What makes two jobs' results interchangeable, across runs: the package's checksum, the
    /// toolchain's exact build (`rustc --version`, since `nightly` moves) and the experiment.
    pub fn memo_key(&self, toolchain_build: &str) -> String {
        use sha2::{Digest as _, Sha256};
        let identity = format!(
            "{}\n{}\n{}\n{}\n{}",
            self.package.checksum,
            toolchain_build,
            self.experiment.mode,
            self.experiment.timeout_secs,
            self.experiment.memory_limit_mb
        );
        // What changes the build besides the toolchain's own build: its variants (`+rustflags=`,
        // ...) and the lint cap. Written only when set, so earlier keys stay what they were.
        let variants = self.toolchain.as_str().strip_prefix(self.toolchain.name());
        let identity = match variants.filter(|v| !v.is_empty()) {
            Some(variants) => format!("{identity}\nvariants {variants}"),
            None => identity,
        };
        let identity = match self.experiment.cap_lints {
            Some(cap) => format!("{identity}\ncap-lints {cap}"),
            None => identity,
        };
        let identity = match &self.experiment.command {
            Some(argv) => format!("{identity}\n{}", argv.join("\0")),
            None => identity,
        };
        let identity = match &self.patch {
            Some(patch) => format!("{identity}\npatch {} {}", patch.name, patch.checksum),
            None => identity,
        };
        hex::encode(Sha256::digest(identity.as_bytes()))
    }

    pub fn to_message(&self) -> Vec<u8> {
        // Cannot fail: every field serializes to plain JSON.
        serde_json::to_vec(self).expect("a Job always serializes")
    }
}

/// Why a message could not be taken as a job; the consumer dead-letters it with this reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJob(pub String);

/// What happened to one job. Stored as its kebab-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Built (check, build, clippy, doc modes) without errors.
    BuildPass,
    BuildFail,
    TestPass,
    TestFail,
    /// The experiment exceeded its time limit and was killed.
    Timeout,
    OutOfMemory,
    /// The package could not even be unpacked or its dependencies resolved.
    Broken,
    /// Quarry's own infrastructure failed (after retries); says nothing about the package.
    Error,
    Skipped,
}

impl Outcome {
    /// Whether the experiment succeeded (it built, or its tests passed).
    pub fn is_pass(self) -> bool {
        matches!(self, Outcome::BuildPass | Outcome::TestPass)
    }

    pub const ALL: [Outcome; 9] = [
        Outcome::BuildPass,
        Outcome::BuildFail,
        Outcome::TestPass,
        Outcome::TestFail,
        Outcome::Timeout,
        Outcome::OutOfMemory,
        Outcome::Broken,
        Outcome::Error,
        Outcome::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::BuildPass => "build-pass",
            Outcome::BuildFail => "build-fail",
            Outcome::TestPass => "test-pass",
            Outcome::TestFail => "test-fail",
            Outcome::Timeout => "timeout",
            Outcome::OutOfMemory => "out-of-memory",
            Outcome::Broken => "broken",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown outcome {s:?}"))
    }
}

/// What a package tried, before any of its code ran, that Quarry refused: the trust boundary's
/// findings, kept on the job's result as machine-readable reasons (the log says the details)
/// and listed by the report. Stored as its kebab-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// It shipped a `.cargo/config[.toml]` or `rust-toolchain[.toml]`, removed before any cargo
    /// command as rustwide does; the job goes on without it.
    OverrideFile,
    /// A removed cargo configuration set what would run a program or send cargo elsewhere
    /// (sources, registries, credential providers, proxies, wrappers, runners, `[env]`,
    /// aliases, `include`, `paths`): an attempt, whatever else the package is.
    HostileConfig,
    /// A dependency, `[patch]` or `[replace]` from git: never fetched; the job is broken.
    GitDependency,
    /// A path (dependency, patch, workspace or target) that leads out of the package: not
    /// followed; the job is broken.
    PathOutsidePackage,
    /// A dependency from a registry other than the run's: not fetched; the job is broken.
    ForeignRegistry,
    /// During resolution cargo tried to connect somewhere other than Quarry's registry
    /// endpoint: refused (it has no other way out of the sandbox).
    Network,
    /// The archive holds what a package has no business holding (links, devices, files
    /// outside its `<name>-<version>/` directory, more than the size limits): not unpacked;
    /// the job is broken.
    UnpackRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::OverrideFile,
        Refusal::HostileConfig,
        Refusal::GitDependency,
        Refusal::PathOutsidePackage,
        Refusal::ForeignRegistry,
        Refusal::Network,
        Refusal::UnpackRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::OverrideFile => "override-file",
            Refusal::HostileConfig => "hostile-config",
            Refusal::GitDependency => "git-dependency",
            Refusal::PathOutsidePackage => "path-outside-package",
            Refusal::ForeignRegistry => "foreign-registry",
            Refusal::Network => "network",
            Refusal::UnpackRefused => "unpack-refused",
        }
    }

    /// Whether the job cannot go on once this is refused: what it needs was not fetched.
    pub fn ends_the_job(self) -> bool {
        matches!(
            self,
            Refusal::GitDependency
                | Refusal::PathOutsidePackage
                | Refusal::ForeignRegistry
                | Refusal::UnpackRefused
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Refusal {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Refusal::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown refusal {s:?}"))
    }
}

/// Why a package could not be prepared for its experiment (its outcome is `broken`), in the
/// classes Crater's rustwide keeps, plus the trust boundary's refusals that end a job: what a
/// triager sorts ten thousand broken packages by. Stored on the result as its kebab-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokenReason {
    /// The package's own manifest is one cargo will not read.
    InvalidManifest,
    /// The package's own lockfile is one cargo will not read, even after Quarry's repair.
    InvalidLockfile,
    /// A dependency's only versions that would do are yanked.
    YankedDependencies,
    /// No version of a dependency would do, or it does not exist.
    MissingDependencies,
    /// A dependency's manifest, download or checksum is bad.
    BrokenDependencies,
    /// Needs a git dependency, which Quarry never fetches ([`Refusal::GitDependency`]).
    GitDependency,
    /// Needs a path out of the package ([`Refusal::PathOutsidePackage`]).
    PathOutsidePackage,
    /// Needs another registry ([`Refusal::ForeignRegistry`]).
    ForeignRegistry,
    /// Its archive was refused ([`Refusal::UnpackRefused`]).
    UnpackRefused,
    /// A patch of the run's could not be applied to it.
    PatchNotApplied,
}

impl BrokenReason {
    pub const ALL: [BrokenReason; 10] = [
        BrokenReason::InvalidManifest,
        BrokenReason::InvalidLockfile,
        BrokenReason::YankedDependencies,
        BrokenReason::MissingDependencies,
        BrokenReason::BrokenDependencies,
        BrokenReason::GitDependency,
        BrokenReason::PathOutsidePackage,
        BrokenReason::ForeignRegistry,
        BrokenReason::UnpackRefused,
        BrokenReason::PatchNotApplied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BrokenReason::InvalidManifest => "invalid-manifest",
            BrokenReason::InvalidLockfile => "invalid-lockfile",
            BrokenReason::YankedDependencies => "yanked-dependencies",
            BrokenReason::MissingDependencies => "missing-dependencies",
            BrokenReason::BrokenDependencies => "broken-dependencies",
            BrokenReason::GitDependency => "git-dependency",
            BrokenReason::PathOutsidePackage => "path-outside-package",
            BrokenReason::ForeignRegistry => "foreign-registry",
            BrokenReason::UnpackRefused => "unpack-refused",
            BrokenReason::PatchNotApplied => "patch-not-applied",
        }
    }

    /// The reason a refusal that ends the job gives it.
    pub fn of_refusal(refusal: Refusal) -> Option<BrokenReason> {
        match refusal {
            Refusal::GitDependency => Some(BrokenReason::GitDependency),
            Refusal::PathOutsidePackage => Some(BrokenReason::PathOutsidePackage),
            Refusal::ForeignRegistry => Some(BrokenReason::ForeignRegistry),
            Refusal::UnpackRefused => Some(BrokenReason::UnpackRefused),
            Refusal::OverrideFile | Refusal::HostileConfig | Refusal::Network => None,
        }
    }

    /// Why a job whose resolution failed is broken, from its log (cargo's words): `None` when
    /// the log shows none of the classes.
    pub fn from_log(log: &str) -> Option<BrokenReason> {
        let has = |sign: &str| log.contains(sign);
        if has("failed to parse lock file") || has("failed to parse lockfile") {
            return Some(BrokenReason::InvalidLockfile);
        }
        if has("failed to select a version for the requirement") && has(" is yanked") {
            return Some(BrokenReason::YankedDependencies);
        }
        if has("failed to select a version for the requirement")
            || has("no matching package named")
            || has("failed to load source for dependency")
        {
            return Some(BrokenReason::MissingDependencies);
        }
        if has("failed to load manifest for dependency") {
            return Some(BrokenReason::BrokenDependencies);
        }
        // Cargo names the manifest it could not read: a dependency's is under the job's cargo
        // home.
        for line in log.lines() {
            if line.contains("failed to parse manifest at")
                || line.contains("failed to load manifest")
            {
                return Some(if line.contains("/registry/src/") {
                    BrokenReason::BrokenDependencies
                } else {
                    BrokenReason::InvalidManifest
                });
            }
        }
        if has("failed to download")
            || has("failed to verify the checksum")
            || has("failed to unpack")
        {
            return Some(BrokenReason::BrokenDependencies);
        }
        None
    }
}

impl fmt::Display for BrokenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BrokenReason {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        BrokenReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown broken reason {s:?}"))
    }
}

/// What happened to a job, as its event log (`job_events.kind`) records it; a job's state is
/// what its events say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Published to the work queue (the job's `published_at`, not a row of its own).
    Queued,
    /// An attempt took a slot.
    Started,
    /// An attempt failed for the infrastructure's sake; the job waits in a retry queue.
    AttemptFailed,
    /// Put aside while an identical job of another run computes the same result.
    Waiting,
    /// Its result was recorded.
    Finished,
    /// Given up on: its message went to the dead letters, with an `error` result.
    DeadLettered,
    /// Taken out of the dead letters and published again.
    Requeued,
    /// Its lease lapsed (its consumer died) and a sweeper published it again.
    LeaseLapsed,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::Queued,
        EventKind::Started,
        EventKind::AttemptFailed,
        EventKind::Waiting,
        EventKind::Finished,
        EventKind::DeadLettered,
        EventKind::Requeued,
        EventKind::LeaseLapsed,
    ];

    /// Its name in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Started => "started",
            EventKind::AttemptFailed => "attempt-failed",
            EventKind::Waiting => "waiting",
            EventKind::Finished => "finished",
            EventKind::DeadLettered => "dead-lettered",
            EventKind::Requeued => "requeued",
            EventKind::LeaseLapsed => "lease-lapsed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown event kind {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job::new(
            RunId(Uuid::nil()),
            PackageVersion {
                name: "itoa".into(),
                version: "1.0.15".into(),
                checksum: "ab".repeat(32),
            },
            "1.95.0".parse().unwrap(),
            Experiment {
                mode: Mode::Check,
                timeout_secs: 60,
                fresh: false,
                memory_limit_mb: 1024,
                command: None,
                cap_lints: None,
            },
        )
    }

    #[test]
    fn job_ids_are_deterministic_and_distinguish_toolchains() {
        let a = job();
        assert_eq!(a.id, job().id);
        let mut b = job();
        b.toolchain = "nightly".parse().unwrap();
        assert_ne!(a.id, JobId::derive(b.run_id, &b.package, &b.side()));
    }

    #[test]
    fn messages_round_trip_and_bad_ones_say_why() {
        let a = job();
        assert_eq!(Job::from_message(&a.to_message()).unwrap(), a);

        let err = Job::from_message(b"{not json").unwrap_err();
        assert!(err.0.contains("not a Quarry job"), "{err}");

        let mut future = serde_json::to_value(&a).unwrap();
        future["format"] = 99.into();
        let err = Job::from_message(future.to_string().as_bytes()).unwrap_err();
        assert!(err.0.contains("format 99"), "{err}");

        let mut tampered = a.clone();
        tampered.package.version = "9.9.9".into();
        let err = Job::from_message(&tampered.to_message()).unwrap_err();
        assert!(err.0.contains("does not match"), "{err}");
    }

    #[test]
    fn toolchain_names_cannot_smuggle_flags() {
        assert!("--config=evil".parse::<Toolchain>().is_err());
        assert!("stable; rm -rf /".parse::<Toolchain>().is_err());
        assert!("nightly-2026-05-19".parse::<Toolchain>().is_ok());
    }

    #[test]
    fn toolchain_variants_are_read_and_checked() {
        let t: Toolchain = "stable+rustflags=-Dwarnings -Cdebuginfo=0+cargoflags=--features x+target=x86_64-unknown-linux-musl"
            .parse()
            .unwrap();
        assert_eq!(t.name(), "stable");
        assert_eq!(t.rustflags(), Some("-Dwarnings -Cdebuginfo=0"));
        assert_eq!(t.cargoflags(), ["--features", "x"]);
        assert_eq!(t.target(), Some("x86_64-unknown-linux-musl"));
        let plain: Toolchain = "1.95.0".parse().unwrap();
        assert_eq!(
            (plain.name(), plain.rustflags(), plain.target()),
            ("1.95.0", None, None)
        );
        for bad in [
            "stable+nope=1",
            "stable+rustflags",
            "stable+rustflags=",
            "stable+rustflags=a+rustflags=b",
            "stable+target=../x",
            "-x+rustflags=a",
        ] {
            assert!(bad.parse::<Toolchain>().is_err(), "{bad}");
        }
        // A variant or a lint cap is not the toolchain it varies: never the same memoized result.
        let a = job();
        let mut b = job();
        b.toolchain = "1.95.0+rustflags=-Dwarnings".parse().unwrap();
        assert_ne!(a.memo_key("build"), b.memo_key("build"));
        let mut c = job();
        c.experiment.cap_lints = Some(CapLints::Warn);
        assert_ne!(a.memo_key("build"), c.memo_key("build"));
    }

    #[test]
    fn broken_jobs_are_told_apart_by_what_cargo_could_not_resolve() {
        let cases = [
            (
                "error: failed to select a version for the requirement `sval = \"^2\"`\n\
                 candidate versions found which didn't match: 2.22.0",
                Some(BrokenReason::MissingDependencies),
            ),
            (
                "error: failed to select a version for the requirement `tokio = \"=1.54.0\"`\n\
                 version 1.54.0 is yanked",
                Some(BrokenReason::YankedDependencies),
            ),
            (
                "error: no matching package named `nope` found",
                Some(BrokenReason::MissingDependencies),
            ),
            (
                "error: failed to parse manifest at `/j/src/x-1.0.0/Cargo.toml`\n\nCaused by:\n  \
                 TOML parse error",
                Some(BrokenReason::InvalidManifest),
            ),
            (
                "error: failed to parse manifest at \
                 `/j/cargo-home/registry/src/quarry/dep-1.0.0/Cargo.toml`",
                Some(BrokenReason::BrokenDependencies),
            ),
            (
                "error: failed to parse lock file at: /j/src/x-1.0.0/Cargo.lock",
                Some(BrokenReason::InvalidLockfile),
            ),
            (
                "error: failed to download from `http://registry.quarry.invalid/...`",
                Some(BrokenReason::BrokenDependencies),
            ),
            ("quarry: refused (git-dependency): ...", None),
        ];
        for (log, expected) in cases {
            assert_eq!(BrokenReason::from_log(log), expected, "{log}");
        }
    }

    #[test]
    fn broken_reasons_round_trip_through_their_names() {
        for reason in BrokenReason::ALL {
            assert_eq!(reason.as_str().parse::<BrokenReason>().unwrap(), reason);
        }
        for refusal in Refusal::ALL {
            assert_eq!(
                BrokenReason::of_refusal(refusal).is_some(),
                refusal.ends_the_job(),
                "{refusal}"
            );
        }
    }

    #[test]
    fn outcomes_round_trip_through_their_names() {
        for outcome in Outcome::ALL {
            assert_eq!(outcome.as_str().parse::<Outcome>().unwrap(), outcome);
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::Value::String(outcome.as_str().into())
            );
        }
    }
}
