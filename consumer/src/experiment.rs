//! Running an experiment on an unpacked package: the cargo steps of its mode, each in its own
//! process group with a cleared environment, under one time limit for the whole job, the output
//! of every step captured (up to a limit) into the job's log.
//!
//! It runs in two parts: [`resolve`] (`cargo fetch`: it runs none of the package's code), which
//! a consumer does while its experiment slots are busy, then [`run`], the steps that run the
//! package's code, once the job has a slot. The time limit counts both, not the wait between
//! them. Every step runs in the sandbox: resolution reaches the registry through the job's
//! gateway and nothing else; the later steps reach nothing. Before each step, the override
//! files a package (or an earlier step) left are removed (`prepare.rs`).
//!
//! Resolution failing means the package is broken; a failing build or test step is the
//! package's outcome. Hitting the time limit kills the whole process tree.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use quarry_core::job::{BrokenReason, Experiment, Mode, Outcome, Refusal};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use crate::cgroup::{CgroupLimits, Cgroups};
use crate::mirror::Mirror;
use crate::prepare::{self, Refused};
use crate::sandbox::{self, Mounts, Sandbox};
use crate::sources::{JobSources, Sources};
use crate::spawn::Spawn;
use crate::toolchains::Installed;
use quarry_core::cost::{Cost, StepCost};

/// The environment every step runs in.
#[derive(Debug, Clone)]
pub struct CargoEnv {
    /// Directories holding `cargo` and `rustup` (the rustup proxies).
    pub path: String,
    pub log_limit_bytes: usize,
    /// Processes and threads a sandboxed step may have at once.
    pub task_limit: u64,
    /// Where the steps that run the package's code are confined.
    pub sandbox: Sandbox,
    /// Where those steps get their cgroup, if this machine lets the consumer create them.
    pub cgroups: Option<Cgroups>,
    /// `quarry-confine` on this host, where it confines here (`confine.rs`): only then do slots
    /// keep target directories across jobs.
    pub confine: Option<PathBuf>,
    /// The store of extracted dependency sources, where jobs share them (`sources.rs`).
    pub sources: Option<Arc<Sources>>,
    /// The pool of compiled units on this host (`units.rs`), shown to jobs that build in a
    /// slot's kept target directory.
    pub units: Option<crate::units::Pool>,
    /// What cargo asked rustc in an earlier job's resolution, per toolchain (`target_info.rs`).
    pub target_info: Arc<crate::target_info::TargetInfo>,
}

/// What running the experiment produced.
#[derive(Debug, Clone)]
pub struct Execution {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub log: String,
    /// What the package tried that was refused (the log says what and where).
    pub refused: Vec<Refusal>,
    /// For a `broken` job, why, where the step that ended it knows (else it is read from the
    /// refusals and the log when the result is recorded: [`Execution::broken_reason`]).
    pub broken_reason: Option<BrokenReason>,
    /// Why its failure points at the environment, where the consumer knows it first-hand (the
    /// sandbox could not start a step); others are read from the log when it is recorded.
    pub environment: Option<String>,
    /// What its steps used (the consumer adds the disk and the wait for a slot); boxed, as
    /// an `Execution` travels in `Result`s.
    pub cost: Box<Cost>,
}

impl Execution {
    /// A job that ends before any cargo command, for `why` (with what was refused on the way).
    pub fn broken(why: &str, refused: &Refused) -> Execution {
        Execution {
            outcome: Outcome::Broken,
            exit_code: None,
            log: format!("{}quarry: {why}\n", refused.log_lines(0)),
            refused: refused.refusals(),
            broken_reason: None,
            environment: None,
            cost: Box::default(),
        }
    }

    /// A job that ends in `error` for `why` (Quarry's failure, not the package's).
    pub fn error(why: String) -> Execution {
        Execution {
            outcome: Outcome::Error,
            exit_code: None,
            log: why,
            refused: Vec::new(),
            broken_reason: None,
            environment: None,
            cost: Box::default(),
        }
    }

    /// The same, broken for `reason`.
    pub fn because(self, reason: BrokenReason) -> Execution {
        Execution {
            broken_reason: Some(reason),
            ..self
        }
    }

    /// Why the job is broken, if it is: what the step said, else the first refusal that ended
    /// it, else what cargo's words in the log say.
    pub fn broken_reason(&self) -> Option<BrokenReason> {
        if self.outcome != Outcome::Broken {
            return None;
        }
        self.broken_reason
            .or_else(|| {
                self.refused
                    .iter()
                    .find_map(|r| BrokenReason::of_refusal(*r))
            })
            .or_else(|| BrokenReason::from_log(&self.log))
    }

    /// Why its failure points at the environment rather than the code, if it does.
    pub fn environment(&self) -> Option<String> {
        self.environment
            .clone()
            .or_else(|| quarry_core::category::environment_of(self.outcome, &self.log))
    }
}

#[derive(Clone)]
struct Step {
    /// Short name, for the step's cgroup.
    name: &'static str,
    /// The program and its arguments.
    argv: Vec<String>,
    /// Resolves: reaches the registry (through the job's gateway) and writes the job's cargo
    /// home. The other steps run the package's code and reach nothing.
    resolves: bool,
    /// The outcome if this step fails.
    on_failure: Outcome,
    /// Its `RUSTFLAGS`, if any.
    rustflags: Option<String>,
}

/// The steps of `experiment` with the job's toolchain (a custom mode runs its command alone), and the
/// outcome when all of them succeed. The toolchain's variants and the lint cap reach the steps
/// that build: `--target` and its cargo flags on their command lines, its rustflags and
/// `--cap-lints` in their `RUSTFLAGS`.
fn steps(experiment: &Experiment, installed: &Installed) -> (Vec<Step>, Outcome) {
    let toolchain = &installed.toolchain;
    let cargo = |args: &[&str]| {
        let mut argv = vec!["cargo".to_owned(), format!("+{}", installed.rustup_name)];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    };
    let rustflags = {
        let cap = experiment.cap_lints.map(|cap| format!("--cap-lints={cap}"));
        let flags: Vec<&str> = toolchain
            .rustflags()
            .into_iter()
            .chain(cap.as_deref())
            .collect();
        (!flags.is_empty()).then(|| flags.join(" "))
    };
    let fetch = Step {
        name: "fetch",
        argv: cargo(&["fetch"]),
        resolves: true,
        on_failure: Outcome::Broken,
        rustflags: None,
    };
    let build = |name, args: &[&str], on_failure| {
        let mut argv = cargo(args);
        if let Some(target) = toolchain.target() {
            argv.extend(["--target".to_owned(), target.to_owned()]);
        }
        argv.extend(toolchain.cargoflags().into_iter().map(str::to_owned));
        Step {
            name,
            argv,
            resolves: false,
            on_failure,
            rustflags: rustflags.clone(),
        }
    };
    let fail = Outcome::BuildFail;
    match experiment.mode {
        Mode::Check => (
            vec![fetch, build("check", &["check", "--frozen"], fail)],
            Outcome::BuildPass,
        ),
        Mode::Build => (
            vec![fetch, build("build", &["build", "--frozen"], fail)],
            Outcome::BuildPass,
        ),
        Mode::Clippy => (
            vec![fetch, build("clippy", &["clippy", "--frozen"], fail)],
            Outcome::BuildPass,
        ),
        Mode::Doc => (
            vec![fetch, build("doc", &["doc", "--frozen", "--no-deps"], fail)],
            Outcome::BuildPass,
        ),
        Mode::Test => (
            vec![
                fetch,
                build("build", &["build", "--frozen", "--all-targets"], fail),
                build("test", &["test", "--frozen"], Outcome::TestFail),
            ],
            Outcome::TestPass,
        ),
        // Nothing resolved or built first: the command decides what it needs (a scan of the
        // sources needs nothing; `cargo` inside finds the toolchain in RUSTUP_TOOLCHAIN).
        Mode::Command => (
            vec![Step {
                name: "command",
                argv: experiment.command.clone().unwrap_or_default(),
                resolves: false,
                on_failure: Outcome::TestFail,
                rustflags,
            }],
            Outcome::TestPass,
        ),
    }
}

/// What a job may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time for the whole job.
    pub time: Duration,
    /// Memory of the steps that run the package's code: of all their processes together where
    /// cgroups are available, else the address space of each process.
    pub memory_bytes: u64,
    /// Processes and threads of such a step together (by its cgroup, else by its sandbox's
    /// `RLIMIT_NPROC`).
    pub tasks: u64,
}

/// This machine's cores (looked up once: the lookup reads the cgroup's CPU quota).
static CORES: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));

/// Largest file a package's code may write (a runaway test writing gigabytes is stopped).
const FILE_SIZE_LIMIT: u64 = 8 << 30;

/// A job's experiment part-way: the steps that resolve and download its dependencies (running
/// none of the package's code) are done; the ones that run its code are left for [`run`].
pub struct Resolved {
    steps: Vec<Step>,
    success: Outcome,
    log: Log,
    refused: Refused,
    /// What the resolving steps used.
    cost: Cost,
    /// The time resolution took, counted against the job's time limit.
    pub spent: Duration,
    /// The stored sources the job's cargo home links to, kept until its last step ends.
    sources: Option<Arc<JobSources>>,
}

/// Where a job's steps run: its scratch directory (which holds the package, its cargo home
/// and its target directory, and is the only place a step can write to) and the package's
/// directory in it.
#[derive(Clone, Copy)]
pub struct Workspace<'a> {
    pub scratch: &'a Path,
    pub package_dir: &'a Path,
    /// The slot's kept target directory, where the job builds in one (`shared_target.rs`);
    /// else its target directory is in `scratch`.
    pub shared_target: Option<&'a Path>,
}

impl Workspace<'_> {
    /// The job's own cargo home (`prepare::write_cargo_home`).
    fn cargo_home(&self) -> PathBuf {
        self.scratch.join("cargo-home")
    }

    /// Where the job's gateway socket is on this host: beside its scratch directory, never in
    /// it, so no step but the one it is bound into can see it.
    fn gateway_socket(&self) -> PathBuf {
        let name = self
            .scratch
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        self.scratch.with_file_name(format!("{name}.sock"))
    }
}

/// Runs the steps of `experiment` that resolve (`cargo fetch`) in `workspace` with `toolchain`, the
/// registry reached through a gateway of the job's own to `mirror`: a consumer does this while
/// its experiment slots are busy. `refused` holds what preparing the package refused, and
/// gathers what resolution refuses. `Ok(Err(_))` is the job's result when it ends here (its
/// dependencies cannot be resolved, or time ran out).
pub async fn resolve(
    env: &CargoEnv,
    mirror: &Mirror,
    workspace: Workspace<'_>,
    toolchain: &Installed,
    experiment: &Experiment,
    limits: Limits,
    mut refused: Refused,
) -> std::io::Result<Result<Resolved, Execution>> {
    let started = Instant::now();
    let mut log = Log::new(env.log_limit_bytes);
    let mut cost = Cost::default();
    log_line(&mut log, &refused.log_lines(0));
    let (mut steps, success) = steps(experiment, toolchain);
    let socket = workspace.gateway_socket();
    prepare::write_cargo_home(
        &workspace.cargo_home(),
        &env.sandbox.registry_socket(&socket),
    )?;
    let resolving = steps.iter().take_while(|step| step.resolves).count();
    let later = steps.split_off(resolving);
    let cargo_home = workspace.cargo_home();
    let sources = env.sources.as_ref().and_then(|sources| {
        sources.for_job(
            &cargo_home,
            &env.sandbox.sources(sources.dir()),
            &toolchain.build,
        )
    });
    if !steps.is_empty() {
        // The resolving steps' target directory (`run_step`), with what cargo learned of the
        // toolchain in an earlier job.
        let target_dir = workspace.scratch.join("target");
        env.target_info.give(&toolchain.rustup_name, &target_dir);
        let gateway = mirror.gateway(&socket, sources.clone())?;
        // A lockfile there now is the package's own (`prepare` kept it).
        let lockfile = workspace.package_dir.join("Cargo.lock");
        let shipped_lock = lockfile.is_file();
        let mut ended = run_steps(
            env,
            workspace,
            (Some(toolchain), Some(gateway.socket())),
            steps.clone(),
            limits,
            started + limits.time,
            (&mut log, &mut refused, &mut cost),
        )
        .await?;
        // The package's own lockfile names versions the registry cannot give (a corpus holds
        // what its roots resolved to today; crates.io may have yanked or lost one), or is one
        // cargo will not read: resolve anew, as cargo would without it, and say so.
        let text = log.text();
        let unusable = if text.contains("locked to") {
            Some("names versions the registry does not have")
        } else if text.contains("failed to parse lock file") {
            Some("is one cargo will not read")
        } else {
            None
        };
        if let Some(failed) = &ended
            && shipped_lock
            && failed.outcome == Outcome::Broken
            && let Some(unusable) = unusable
            && std::fs::remove_file(&lockfile).is_ok()
        {
            let before = refused.len();
            refused.changed(format!(
                "the package's Cargo.lock {unusable}: removed, cargo writes a new one"
            ));
            log_line(&mut log, &refused.log_lines(before));
            // Named anew: the first attempt's cgroups are still being removed.
            let again = steps
                .into_iter()
                .map(|step| Step {
                    name: if step.resolves { "refetch" } else { step.name },
                    ..step
                })
                .collect();
            ended = run_steps(
                env,
                workspace,
                (Some(toolchain), Some(gateway.socket())),
                again,
                limits,
                started + limits.time,
                (&mut log, &mut refused, &mut cost),
            )
            .await?;
        }
        for target in gateway.refused() {
            let before = refused.len();
            refused.add(
                Refusal::Network,
                format!(
                    "cargo was made to connect to {target} while resolving: only Quarry's \
                     registry endpoint can be reached"
                ),
            );
            log_line(&mut log, &refused.log_lines(before));
        }
        // Not a refusal: the job goes on, cargo extracting in the sandbox what the consumer
        // would not extract outside it.
        for why in sources.iter().flat_map(|sources| sources.refused()) {
            log_line(
                &mut log,
                &format!(
                    "quarry: not stored outside the sandbox, {why}: cargo extracts it in the job"
                ),
            );
        }
        drop(gateway);
        if ended.is_none() {
            env.target_info.keep(&toolchain.rustup_name, &target_dir);
        }
        if let Some(ended) = ended {
            return Ok(Err(Execution {
                log: log.text(),
                refused: refused.refusals(),
                cost: Box::new(cost),
                ..ended
            }));
        }
    }
    Ok(Ok(Resolved {
        steps: later,
        success,
        log,
        refused,
        cost,
        spent: started.elapsed(),
        sources,
    }))
}

/// Runs the rest of a resolved experiment: the steps that run the package's code, in the
/// sandbox, within what resolution left of the job's time limit.
pub async fn run(
    env: &CargoEnv,
    workspace: Workspace<'_>,
    toolchain: &Installed,
    resolved: Resolved,
    limits: Limits,
) -> std::io::Result<Execution> {
    let Resolved {
        steps,
        success,
        mut log,
        mut refused,
        mut cost,
        spent,
        sources,
    } = resolved;
    let deadline = Instant::now() + limits.time.saturating_sub(spent);
    let ended = run_steps(
        env,
        workspace,
        (Some(toolchain), None),
        steps,
        limits,
        deadline,
        (&mut log, &mut refused, &mut cost),
    )
    .await?;
    // No step is left to read them.
    drop(sources);
    let execution = ended.unwrap_or_else(|| finish(&log, success, Some(0)));
    Ok(Execution {
        refused: refused.refusals(),
        cost: Box::new(cost),
        ..execution
    })
}

/// Whether this consumer can set up a step at all: a scratch directory in `jobs_dir`, and `true`
/// run in it as a job's steps run (the sandbox, a cgroup, the limits). `Err` says why not.
pub async fn check_host(env: &CargoEnv, jobs_dir: &Path) -> Result<(), String> {
    let scratch = jobs_dir.join(format!(".check-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let place = Place {
        workspace: Workspace {
            scratch: &scratch,
            package_dir: &scratch,
            shared_target: None,
        },
        mounts: Mounts::only(&scratch),
        name: "check",
        limits: Limits {
            time: Duration::from_secs(30),
            memory_bytes: 256 << 20,
            tasks: 64,
        },
        rustflags: None,
    };
    let mut log = Log::new(64 << 10);
    let ran = run_step(
        env,
        &place,
        None,
        &["true".to_owned()],
        Instant::now() + place.limits.time,
        &mut log,
    )
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    match ran {
        Ok(Ran {
            status: StepStatus::Exited(0),
            ..
        }) => Ok(()),
        Ok(_) => Err(format!(
            "`true` failed in the sandbox: {}",
            log.text().trim()
        )),
        Err(err) => Err(format!("cannot run a step: {err}")),
    }
}

/// Runs `steps` in order until one fails: `Some` is the job's result then (without what was
/// refused, which the caller adds). `registry` is the job's gateway socket, for the steps
/// that resolve.
async fn run_steps(
    env: &CargoEnv,
    workspace: Workspace<'_>,
    (toolchain, registry): (Option<&Installed>, Option<&Path>),
    steps: Vec<Step>,
    limits: Limits,
    deadline: Instant,
    (log, refused, cost): (&mut Log, &mut Refused, &mut Cost),
) -> std::io::Result<Option<Execution>> {
    let timeout = limits.time;
    let scratch = workspace.scratch;
    for step in steps {
        if step.argv.is_empty() {
            log_line(log, "quarry: the experiment's custom mode has no command\n");
            return Ok(Some(finish(log, Outcome::Error, None)));
        }
        // What an earlier step may have written where cargo or rustup would read it.
        let before = refused.len();
        prepare::remove_override_files(scratch, workspace.package_dir, refused);
        log_line(log, &refused.log_lines(before));
        if refused.ends_the_job() {
            return Ok(Some(finish(log, Outcome::Broken, None)));
        }
        log_line(log, &format!("$ {}\n", step.argv.join(" ")));
        let output_from = log.len();
        let step_name = format!(
            "{}-{}",
            scratch.file_name().unwrap_or_default().to_string_lossy(),
            step.name
        );
        let cargo_home = workspace.cargo_home();
        let read_only = [cargo_home.as_path()];
        let place = Place {
            workspace,
            mounts: Mounts {
                writable: scratch,
                // Once resolved, what cargo downloaded and its configuration are only read.
                read_only: if step.resolves { &[] } else { &read_only },
                registry: registry.filter(|_| step.resolves),
                cargo_home: Some((&cargo_home, step.resolves)),
                sources: env.sources.as_deref().map(Sources::dir),
                // Resolution builds nothing.
                shared_target: workspace
                    .shared_target
                    .zip(env.confine.as_deref())
                    .filter(|_| !step.resolves),
                units: env
                    .units
                    .as_ref()
                    .map(crate::units::Pool::dir)
                    .filter(|_| workspace.shared_target.is_some() && !step.resolves),
            },
            name: &step_name,
            limits,
            rustflags: step.rustflags.as_deref(),
        };
        let ran = run_step(env, &place, toolchain, &step.argv, deadline, log).await?;
        let (status, out_of_memory) = (ran.status, ran.out_of_memory);
        cost.add(StepCost {
            name: step.name.to_owned(),
            ..ran.cost
        });
        if out_of_memory && !matches!(status, StepStatus::TimedOut | StepStatus::Exited(0)) {
            log_line(
                log,
                &format!(
                    "\nquarry: out of memory: the kernel killed a process of this step for using \
                     more than the limit of {} MiB (all its processes together)\n",
                    limits.memory_bytes >> 20
                ),
            );
            let code = match status {
                StepStatus::Exited(code) => Some(code),
                _ => None,
            };
            return Ok(Some(finish(log, Outcome::OutOfMemory, code)));
        }
        match status {
            StepStatus::TimedOut => {
                log_line(
                    log,
                    &format!(
                        "\nquarry: killed after the time limit of {}s\n",
                        timeout.as_secs()
                    ),
                );
                return Ok(Some(finish(log, Outcome::Timeout, None)));
            }
            StepStatus::Exited(0) => {}
            StepStatus::Exited(code) => {
                // Bubblewrap's own errors come before anything of the step's: the sandbox could
                // not start it, which says nothing about the package.
                if matches!(env.sandbox, Sandbox::Bubblewrap { .. })
                    && let Some(line) = log.starts_with_line(output_from, "bwrap: ")
                {
                    let why = format!("sandbox error: {line}");
                    log_line(
                        log,
                        &format!("\nquarry: {why}: the sandbox could not start this step\n"),
                    );
                    let execution = finish(log, step.on_failure, Some(code));
                    return Ok(Some(Execution {
                        environment: Some(why),
                        ..execution
                    }));
                }
                let outcome = failure_outcome(log, step.on_failure);
                return Ok(Some(finish(log, outcome, Some(code))));
            }
            StepStatus::Signalled(signal) => {
                log_line(log, &format!("\nquarry: step killed by signal {signal}\n"));
                let outcome = failure_outcome(log, step.on_failure);
                return Ok(Some(finish(log, outcome, None)));
            }
        }
    }
    Ok(None)
}

/// A failed step whose log shows allocations failing ran out of memory, whatever the step.
fn failure_outcome(log: &Log, on_failure: Outcome) -> Outcome {
    let text = log.text();
    let out_of_memory = (text.contains("memory allocation of ") && text.contains(" failed"))
        || text.contains("Cannot allocate memory")
        || text.contains("LLVM ERROR: out of memory");
    if out_of_memory {
        Outcome::OutOfMemory
    } else {
        on_failure
    }
}

fn finish(log: &Log, outcome: Outcome, exit_code: Option<i32>) -> Execution {
    Execution {
        outcome,
        exit_code,
        log: log.text(),
        refused: Vec::new(),
        broken_reason: None,
        environment: None,
        cost: Box::default(),
    }
}

enum StepStatus {
    Exited(i32),
    Signalled(i32),
    TimedOut,
}

/// Where a step runs, and how it is confined.
struct Place<'a> {
    workspace: Workspace<'a>,
    mounts: Mounts<'a>,
    /// The step's name, for its cgroup.
    name: &'a str,
    limits: Limits,
    /// The step's `RUSTFLAGS`, if any.
    rustflags: Option<&'a str>,
}

/// How a step ended, and what it used.
struct Ran {
    status: StepStatus,
    /// Whether the kernel killed part of it for lack of memory.
    out_of_memory: bool,
    /// Without the step's name.
    cost: StepCost,
}

/// Runs one step.
async fn run_step(
    env: &CargoEnv,
    place: &Place<'_>,
    toolchain: Option<&Installed>,
    argv: &[String],
    deadline: Instant,
    log: &mut Log,
) -> std::io::Result<Ran> {
    let started = Instant::now();
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let Workspace {
        scratch,
        package_dir,
        ..
    } = place.workspace;
    let limits = place.limits;
    // Without a cgroup, the sandbox counts the step's processes.
    let tasks = env.cgroups.is_none().then_some(limits.tasks);
    // Nor does anything count what the step used but the sandbox's reaper, on a pipe of its own.
    // Non-blocking: read once the step has ended, when the report is there or never will be.
    let report = (tasks.is_some() && env.sandbox.reaps())
        .then(|| {
            use nix::fcntl::OFlag;
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        })
        .transpose()
        .map_err(std::io::Error::from)?
        .map(|(read, write)| (std::fs::File::from(read), write));
    let (program, args) = env.sandbox.command_line(
        &place.mounts,
        package_dir,
        &argv[0],
        &args,
        tasks,
        report.is_some(),
    );
    // Nothing of the consumer's environment (credentials included) reaches the package; its
    // own process group, so a timeout kills rustc, build scripts and tests too.
    let mut command = Spawn::new(program, package_dir);
    command
        .args(args)
        .env("PATH", &env.path)
        .env("HOME", scratch)
        .env(
            "CARGO_HOME",
            env.sandbox.cargo_home(&place.workspace.cargo_home()),
        )
        .env("CARGO_TERM_COLOR", "never")
        .env("CARGO_INCREMENTAL", "0");
    if place.mounts.shared_target.is_some() {
        // Every rustc through `quarry-confine`, which puts build scripts behind it too; the
        // package's own tree stays writable for them.
        command
            .env("CARGO_TARGET_DIR", sandbox::SHARED_TARGET)
            .env("RUSTC_WRAPPER", crate::confine::SANDBOX_PATH)
            .env(crate::confine::WRITABLE_ENV, scratch.join("src"));
        if place.mounts.units.is_some() {
            command.env(crate::units::POOL_ENV, crate::units::SANDBOX_PATH);
        }
    } else {
        command.env("CARGO_TARGET_DIR", scratch.join("target"));
    }
    if let Some(toolchain) = toolchain {
        command
            .env("RUSTUP_HOME", &toolchain.home)
            .env("RUSTUP_TOOLCHAIN", &toolchain.rustup_name)
            // A toolchain the consumer lacks is never installed by a step.
            .env("RUSTUP_AUTO_INSTALL", "0");
    }
    if let Some(rustflags) = place.rustflags {
        command.env("RUSTFLAGS", rustflags);
    }
    let cgroup = match &env.cgroups {
        Some(cgroups) => Some(cgroups.step(
            place.name,
            CgroupLimits {
                memory_bytes: limits.memory_bytes,
                tasks: limits.tasks,
            },
        )?),
        None => None,
    };
    use nix::sys::resource::Resource;
    if let Some(cgroup) = &cgroup {
        command.join_cgroups(cgroup.join_fds());
    } else {
        // Without a cgroup, the address space of each process is all that can be limited.
        command.rlimit(Resource::RLIMIT_AS, limits.memory_bytes);
    }
    // CPU time per process: never less than the wall-clock limit on every core.
    command
        .rlimit(
            Resource::RLIMIT_CPU,
            limits.time.as_secs().saturating_mul(*CORES),
        )
        .rlimit(Resource::RLIMIT_FSIZE, FILE_SIZE_LIMIT)
        .rlimit(Resource::RLIMIT_CORE, 0);
    // One pipe for stdout and stderr: the log keeps the order they were written in, as a
    // terminal would show it, and is read here, in the step's own task.
    let (output_writer, output) = tokio::net::unix::pipe::pipe()?;
    let output_writer = output_writer.into_blocking_fd()?;
    command
        .stdout(output_writer.try_clone()?)
        .stderr(output_writer);
    // Spawned from this thread, not a blocking one: bubblewrap's `--die-with-parent` is tied to
    // the thread that started it, and blocking threads exit when idle.
    let report = report.map(|(read, write)| {
        command.fd3(write);
        read
    });
    let mut child = command.spawn()?;
    let group = ProcessGroup(Pid::from_raw(child.id()));
    let mut capture = Capture {
        output,
        buffer: vec![0; 8192],
        open: true,
    };
    let ran = tokio::time::timeout_at(deadline, async {
        loop {
            tokio::select! {
                status = child.wait() => return status,
                () = capture.next(log), if capture.open => {}
            }
        }
    })
    .await;
    // Leftover processes of the step (a daemonized build script) die with it; on a timeout,
    // the whole tree does.
    group.kill();
    if let Some(cgroup) = &cgroup {
        cgroup.signal();
    }
    let status = match ran {
        Ok(status) => Some(status?),
        Err(_) => {
            child.wait().await?;
            None
        }
    };
    // What was written last is in the pipe until read. It ends once every process holding it
    // is gone; do not wait past that.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while capture.open {
            capture.next(log).await;
        }
    })
    .await;
    let out_of_memory = cgroup.as_ref().is_some_and(|c| c.out_of_memory());
    // The cgroup counts every process the step had. Without one: unsandboxed, the rusage of
    // the process waited for covers its tree; sandboxed, bubblewrap's init passes none on, and
    // the reaper's report does (written before it exited, so in the pipe now, or never).
    let usage = match report {
        Some(mut report) => {
            let mut text = [0u8; 256];
            let mut len = 0;
            while let Ok(read @ 1..) = std::io::Read::read(&mut report, &mut text[len..]) {
                len += read;
            }
            std::str::from_utf8(&text[..len])
                .ok()
                .and_then(crate::reap::Report::parse)
                .map(|r| (r.cpu, r.peak_memory_bytes))
        }
        None => matches!(env.sandbox, Sandbox::Unsandboxed)
            .then(|| child.usage().unwrap_or_default())
            .map(|u| (u.cpu, u.max_rss_bytes)),
    };
    let cost = StepCost {
        name: String::new(),
        wall_ms: millis(started.elapsed()),
        cpu_ms: match cgroup.as_ref().and_then(|c| c.cpu_time()) {
            Some(cpu) => Some(millis(cpu)),
            None => usage.map(|(cpu, _)| millis(cpu)),
        },
        // The whole tree's: the cgroup's count, else the reaper's samples (unsandboxed, the largest
        // process's).
        peak_memory_bytes: match cgroup.as_ref().and_then(|c| c.peak_memory_bytes()) {
            Some(peak) => Some(peak),
            None => usage.map(|(_, rss)| rss),
        },
    };
    if let Some(cgroup) = cgroup {
        cgroup.remove_in_background();
    }
    let Some(status) = status else {
        return Ok(Ran {
            status: StepStatus::TimedOut,
            out_of_memory: false,
            cost,
        });
    };
    let status = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => StepStatus::Exited(code),
        (None, Some(signal)) => StepStatus::Signalled(signal),
        (None, None) => StepStatus::Exited(-1),
    };
    Ok(Ran {
        status,
        out_of_memory,
        cost,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Kills a whole process group when asked, and when dropped (a cancelled job).
struct ProcessGroup(Pid);

impl ProcessGroup {
    fn kill(&self) {
        // ESRCH (already gone) is the common, harmless case.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a step's output into its log.
struct Capture {
    output: tokio::net::unix::pipe::Receiver,
    buffer: Vec<u8>,
    /// Until the pipe ends (or fails).
    open: bool,
}

impl Capture {
    /// Reads what is there (waiting for it) into `log`. Cancel-safe: nothing is read until the
    /// read completes.
    async fn next(&mut self, log: &mut Log) {
        match self.output.read(&mut self.buffer).await {
            Ok(0) | Err(_) => self.open = false,
            Ok(n) => log.push(&self.buffer[..n]),
        }
    }
}

fn log_line(log: &mut Log, text: &str) {
    log.push(text.as_bytes());
}

/// Captured output, cut at a limit with a marker saying how much was dropped.
struct Log {
    bytes: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl Log {
    fn new(limit: usize) -> Log {
        Log {
            bytes: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        let kept = chunk.len().min(room);
        self.bytes.extend_from_slice(&chunk[..kept]);
        self.dropped += (chunk.len() - kept) as u64;
    }

    /// Bytes kept so far: where the next output starts.
    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The first line of what was kept from `from` on, if it starts with `prefix`.
    fn starts_with_line(&self, from: usize, prefix: &str) -> Option<String> {
        let rest = self.bytes.get(from..)?;
        let line = rest.split(|b| *b == b'\n').next()?;
        let line = String::from_utf8_lossy(line);
        line.starts_with(prefix)
            .then(|| line.trim().chars().take(300).collect())
    }

    fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!(
                "\n[quarry: output truncated, {} more bytes dropped]\n",
                self.dropped
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `argv` as one `check` step in `sandbox` without a cgroup, with `scratch` as the
    /// job's scratch directory and package; what it ended as (`None`: it passed), its log and
    /// its cost.
    async fn one_step(
        sandbox: Sandbox,
        scratch: &Path,
        argv: &[&str],
    ) -> (Option<Execution>, Log, Cost) {
        let env = CargoEnv {
            path: "/usr/bin:/bin".to_owned(),
            log_limit_bytes: 64 << 10,
            task_limit: 64,
            sandbox,
            cgroups: None,
            confine: None,
            sources: None,
            units: None,
            target_info: Default::default(),
        };
        let workspace = Workspace {
            scratch,
            package_dir: scratch,
            shared_target: None,
        };
        let step = Step {
            name: "check",
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            resolves: false,
            on_failure: Outcome::BuildFail,
            rustflags: None,
        };
        let limits = Limits {
            time: Duration::from_secs(60),
            memory_bytes: 512 << 20,
            tasks: 64,
        };
        let mut log = Log::new(64 << 10);
        let mut refused = Refused::default();
        let mut cost = Cost::default();
        let ended = run_steps(
            &env,
            workspace,
            (None, None),
            vec![step],
            limits,
            Instant::now() + limits.time,
            (&mut log, &mut refused, &mut cost),
        )
        .await
        .unwrap();
        (ended, log, cost)
    }

    /// A sandbox that cannot start a step (here: told to mount what is not there) is the
    /// machine's failure, said as such, not the package's.
    #[tokio::test]
    async fn a_step_the_sandbox_cannot_start_fails_for_the_environment() {
        let Some(bwrap) = crate::sandbox::find_on_path("bwrap") else {
            panic!("bubblewrap is needed: deploy/local/up installs it");
        };
        let scratch = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::Bubblewrap {
            bwrap,
            read_only: vec![scratch.path().join("gone")],
            hidden: Vec::new(),
            prlimit: None,
            reaper: None,
        };
        let (ended, _, _) = one_step(sandbox, scratch.path(), &["true"]).await;
        let ended = ended.expect("the step failed");
        assert_eq!(ended.outcome, Outcome::BuildFail);
        let why = ended.environment().unwrap();
        assert!(why.starts_with("sandbox error: bwrap: "), "{why}");
        assert!(
            ended.log.contains("the sandbox could not start this step"),
            "{}",
            ended.log
        );
    }

    /// A sandbox whose steps run under the reaper (as without cgroups), and a scratch
    /// directory for one step.
    async fn reaping() -> (Sandbox, tempfile::TempDir) {
        let mut sandbox = Sandbox::bubblewrap(Vec::new()).await.unwrap();
        let reaper = crate::host::confine_program().expect("cargo test builds quarry-confine");
        sandbox.reap_with(reaper);
        let scratch = tempfile::tempdir().unwrap();
        std::fs::create_dir(scratch.path().join("cargo-home")).unwrap();
        (sandbox, scratch)
    }

    /// Where no cgroup counts a step (a pod), its reaper does: the CPU of every process the
    /// step had, one orphaned by its parent included.
    #[tokio::test]
    async fn a_steps_cpu_is_counted_without_a_cgroup() {
        let (sandbox, scratch) = reaping().await;
        // The work (0.5 to 1 CPU-seconds, as fast as the machine is: at least three times
        // the 150 ms asserted below) is done by a grandchild whose parent has exited:
        // bubblewrap's init would have reaped it, and what it used with it (9 ms were counted
        // without the reaper). Another orphan outlives the step's command: the step still
        // ends with the command.
        let script = "( (awk 'BEGIN { for (i = 0; i < 20000000; i++); }'; touch done) & ); \
                      ( sleep 60 & ); \
                      while [ ! -e done ]; do sleep 0.05; done; echo finished";
        let (ended, log, cost) = one_step(sandbox, scratch.path(), &["sh", "-c", script]).await;
        assert!(ended.is_none(), "the step failed: {}", log.text());
        let text = log.text();
        assert!(text.trim_end().ends_with("\nfinished"), "{text}");
        assert!(
            !text.contains("cpu_us"),
            "the report is not in the log: {text}"
        );
        let step = &cost.steps[0];
        let cpu = step.cpu_ms.expect("the step's CPU is counted");
        assert!(cpu >= 150, "{step:?}");
        assert!(cpu <= step.wall_ms * 2 + 50, "{step:?}");
        assert!(
            step.wall_ms < 30_000,
            "the leftover sleep was waited for: {step:?}"
        );
        assert!(step.peak_memory_bytes.is_some_and(|b| b > 0), "{step:?}");
    }

    /// Without a cgroup, a step's peak memory is its processes' together, not its largest
    /// one's: three processes holding 64 MiB each at once.
    #[tokio::test]
    async fn a_steps_memory_is_counted_together_without_a_cgroup() {
        let (sandbox, scratch) = reaping().await;
        let hold = "x = b'q' * (64 << 20); import time; time.sleep(1.5)";
        let script =
            format!("for i in 1 2 3; do python3 -c \"{hold}\" & done; wait; echo finished");
        let (ended, log, cost) = one_step(sandbox, scratch.path(), &["sh", "-c", &script]).await;
        assert!(ended.is_none(), "the step failed: {}", log.text());
        let step = &cost.steps[0];
        let peak = step
            .peak_memory_bytes
            .expect("the step's memory is counted");
        assert!(peak >= 3 * (64 << 20), "{step:?}");
        assert!(peak < 1 << 30, "{step:?}");
    }

    #[test]
    fn the_log_is_cut_with_a_marker() {
        let mut log = Log::new(4);
        log.push(b"abcdef");
        log.push(b"gh");
        let text = log.text();
        assert!(text.starts_with("abcd\n"), "{text}");
        assert!(text.contains("4 more bytes dropped"), "{text}");
    }
}
