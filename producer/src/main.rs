//! `quarry-producer`: starts runs. A thin command line over the `quarry_producer` library.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use quarry_core::job::{CapLints, Experiment, Mode, Toolchain};
use quarry_infra::Config;
use quarry_infra::config::ConfigArgs;
use quarry_infra::store::Store;
use quarry_producer::selection::{Dependents, Filter, Sample};
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};

/// Starts Quarry runs: pages a crates.io-compatible registry and publishes one job per package
/// version and toolchain to RabbitMQ, recording each in PostgreSQL first. Re-running the same
/// command continues an interrupted run without publishing anything twice.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create (or continue) a run and publish its jobs.
    Run(Box<RunArgs>),
    /// List runs, newest first, with their progress.
    Runs,
    /// Show a run (by id or name): its definition, what the producer did, progress and outcomes.
    Show {
        /// The run's id or name.
        run: String,
    },
    /// Cancel a run: consumers record its remaining jobs as skipped instead of running them.
    Cancel {
        /// The run's id or name.
        run: String,
    },
    /// The consumer fleet: who is alive, since when, and which jobs each has in hand.
    Consumers {
        /// Also list consumers gone for more than an hour.
        #[arg(long)]
        all: bool,
    },
    /// Put back on the work queue every job of a run that has no result and that no live
    /// consumer has in hand: the recovery after the broker lost its queues. Results stay one per
    /// job whatever happens; refused while the queues still hold messages, unless --force.
    Republish {
        /// The run's id or name.
        run: String,
        /// Republish even though the queues still hold messages (some jobs may then run twice).
        #[arg(long)]
        force: bool,
    },
    /// Give a run's dead-lettered jobs a fresh set of attempts, once what made them fail is
    /// fixed: their `error` results are removed (the event log keeps everything), they are
    /// published again and their copies leave the dead-letter queue.
    Requeue {
        /// The run's id or name.
        run: String,
    },
    /// Apply database migrations and exit.
    Migrate,
}

/// A run's definition: flags, or the same keys in an experiment file (`--experiment FILE`,
/// see docs/experiments.md), never both.
#[derive(clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    /// Read the run's definition from a TOML file instead of flags.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    experiment: Option<std::path::PathBuf>,
    /// Name of the run; running the same name again resumes it.
    #[arg(
        long,
        required_unless_present = "experiment",
        conflicts_with = "experiment"
    )]
    name: Option<String>,
    /// Rustup toolchain to test with; give it twice (start, then end) to compare two. Variants
    /// as Crater writes them: `stable+rustflags=-Dwarnings`, `+cargoflags=...`, `+target=...`.
    #[arg(
        long = "toolchain",
        value_name = "TOOLCHAIN",
        required_unless_present_any = ["experiment", "toolchain_files"],
        conflicts_with = "experiment"
    )]
    #[serde(default)]
    toolchains: Vec<Toolchain>,
    /// A toolchain given as a file, such as a pull request's compiler build: NAME=FILE, a
    /// rustup dist tarball or CI artifact (`rust-nightly-x86_64-unknown-linux-gnu.tar.xz`) or
    /// an installed toolchain directory packed with tar. Uploaded to S3 with the run; each
    /// consumer installs it the first time it needs it. NAME is a side of the run: after the
    /// --toolchain ones unless one of them names it (with variants, say).
    #[arg(
        long = "toolchain-file",
        value_name = "NAME=FILE",
        conflicts_with = "experiment"
    )]
    #[serde(default)]
    toolchain_files: Vec<String>,
    /// What to do with each package.
    #[arg(long, value_parser = mode_parser(), default_value_t = Mode::Check, conflicts_with = "experiment")]
    #[serde(default = "default_mode")]
    mode: Mode,
    /// Time limit for one package's experiment, in seconds.
    #[arg(long, default_value_t = 600, conflicts_with = "experiment")]
    #[serde(default = "default_timeout")]
    timeout: u64,
    /// Memory an experiment may use, in MiB (its whole process tree, with cgroups).
    #[arg(
        long,
        default_value_t = 4096,
        value_name = "MIB",
        conflicts_with = "experiment"
    )]
    #[serde(default = "default_memory_limit")]
    memory_limit: u64,
    /// Cap every lint at this level, the package's own code included (`rustc --cap-lints`, as
    /// Crater's `cap-lints`): `warn` keeps a lint new in the end toolchain from failing a
    /// `#![deny(warnings)]` crate. Unset, lints are as each package says.
    #[arg(long, value_parser = cap_lints_parser(), value_name = "LEVEL", conflicts_with = "experiment")]
    #[serde(default)]
    cap_lints: Option<CapLints>,
    /// Take at most this many crates from the registry listing.
    #[arg(long, conflicts_with_all = ["packages", "experiment"])]
    #[serde(default)]
    limit: Option<u64>,
    /// Order of the registry listing.
    #[arg(long, value_enum, default_value_t = Sort::Alpha, conflicts_with = "experiment")]
    #[serde(default = "default_sort")]
    sort: Sort,
    /// Test exactly these packages (`name` or `name@version`) instead of paging the listing.
    #[arg(
        long = "package",
        value_name = "NAME[@VERSION]",
        conflicts_with = "experiment"
    )]
    #[serde(default)]
    packages: Vec<String>,
    /// Test the packages listed in FILE: one `name` or `name@version` per line, `#` comments.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["packages", "limit", "experiment"])]
    #[serde(default)]
    list: Option<std::path::PathBuf>,
    /// Read the crates from a crates.io database dump (db-dump.tar.gz, downloaded beforehand)
    /// instead of paging the registry's web API: the fast path for large runs, and the only
    /// source with every version's checksum at hand. --limit and --sort apply to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["packages", "list", "experiment"])]
    #[serde(default)]
    dump: Option<std::path::PathBuf>,
    /// Test every version ever published of each crate, not only its newest.
    #[arg(long, conflicts_with = "experiment")]
    #[serde(default)]
    all_versions: bool,
    /// Include yanked versions (skipped by default).
    #[arg(long, conflicts_with = "experiment")]
    #[serde(default)]
    yanked: bool,
    /// Include pre-release versions such as 1.0.0-rc.1 (skipped by default).
    #[arg(long, conflicts_with = "experiment")]
    #[serde(default)]
    prereleases: bool,
    /// Only crates whose name matches this glob (`serde*`, `tokio-?`); may be given several
    /// times.
    #[arg(long = "pattern", value_name = "GLOB", conflicts_with = "experiment")]
    #[serde(default)]
    patterns: Vec<String>,
    /// Only the crates that depend on this one (read from the index, or from the dump).
    #[arg(long, value_name = "CRATE", conflicts_with = "experiment")]
    #[serde(default)]
    dependents_of: Option<String>,
    /// With --dependents-of: how many links away a dependent may be (1: direct dependents).
    #[arg(
        long,
        default_value_t = 1,
        requires = "dependents_of",
        conflicts_with = "experiment"
    )]
    #[serde(default = "default_depth")]
    depth: u32,
    /// A random sample of this many crates (after the other filters), the same for the same
    /// --seed.
    #[arg(long, value_name = "N", conflicts_with = "experiment")]
    #[serde(default)]
    sample: Option<u64>,
    /// The sample's seed.
    #[arg(
        long,
        default_value_t = 0,
        requires = "sample",
        conflicts_with = "experiment"
    )]
    #[serde(default)]
    seed: u64,
    /// A dependency-patch run: test each package as published and with this dependency
    /// replaced through [patch.crates-io], by a version the registry serves (NAME=VERSION) or by
    /// a package made with `cargo package`, uploaded with the run (NAME=FILE.crate). Takes one
    /// --toolchain; the two sides are then without and with the patch.
    #[arg(
        long,
        value_name = "NAME=VERSION|NAME=FILE.crate",
        conflicts_with = "experiment"
    )]
    #[serde(default)]
    patch: Option<String>,
    /// Take the packages of an earlier run (with --only), pinned to the versions it tested.
    #[arg(
        long,
        value_name = "RUN",
        requires = "only",
        conflicts_with_all = ["packages", "limit", "list", "experiment"]
    )]
    #[serde(default)]
    from_run: Option<String>,
    /// Which packages of --from-run to take; several may be given, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', requires = "from_run")]
    #[serde(default)]
    only: Vec<quarry_producer::Only>,
    /// Wait until every job has a result, showing progress.
    #[arg(long)]
    #[serde(default)]
    wait: bool,
    /// With `--mode command`: the program and arguments to run in each unpacked package, after
    /// `--` (no shell: `-- sh -c '...'` for one). Exit 0 is test-pass, anything else test-fail.
    #[arg(last = true, value_name = "COMMAND", conflicts_with = "experiment")]
    #[serde(default)]
    command: Vec<String>,
    /// Run every job, even those an earlier run already did with the same package checksum,
    /// toolchain build and experiment (by default their results are reused).
    #[arg(long, conflicts_with = "experiment")]
    #[serde(default)]
    fresh: bool,
}

/// The modes by name (the domain's types know nothing of the command line).
fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(
        Mode::ALL
            .map(|mode| clap::builder::PossibleValue::new(mode.as_str()).help(mode.describe())),
    )
    .map(|name| name.parse::<Mode>().expect("one of the possible values"))
}

/// The lint levels by name.
fn cap_lints_parser() -> impl clap::builder::TypedValueParser<Value = CapLints> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(CapLints::ALL.map(CapLints::as_str)).map(|name| {
        name.parse::<CapLints>()
            .expect("one of the possible values")
    })
}

fn default_mode() -> Mode {
    Mode::Check
}
fn default_timeout() -> u64 {
    600
}
fn default_memory_limit() -> u64 {
    4096
}
fn default_sort() -> Sort {
    Sort::Alpha
}
fn default_depth() -> u32 {
    1
}

impl RunArgs {
    /// The definition from the experiment file, if one was given (`--wait` may still come from
    /// the command line).
    fn resolve(self) -> anyhow::Result<RunArgs> {
        let Some(path) = &self.experiment else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the experiment file {}", path.display()))?;
        let mut from_file: RunArgs = toml::from_str(&text)
            .with_context(|| format!("invalid experiment file {}", path.display()))?;
        from_file.wait |= self.wait;
        anyhow::ensure!(
            from_file.name.is_some(),
            "the experiment file {} has no `name`",
            path.display()
        );
        anyhow::ensure!(
            !from_file.toolchains.is_empty() || !from_file.toolchain_files.is_empty(),
            "the experiment file {} has no `toolchains`",
            path.display()
        );
        let exclusive = [
            from_file.limit.is_some(),
            !from_file.packages.is_empty(),
            from_file.list.is_some(),
            from_file.from_run.is_some(),
        ];
        anyhow::ensure!(
            exclusive.iter().filter(|given| **given).count() <= 1,
            "the experiment file {}: `limit`, `packages`, `list` and `from_run` exclude each other",
            path.display()
        );
        anyhow::ensure!(
            from_file.dump.is_none()
                || (from_file.packages.is_empty()
                    && from_file.list.is_none()
                    && from_file.from_run.is_none()),
            "the experiment file {}: `dump` excludes `packages`, `list` and `from_run`",
            path.display()
        );
        anyhow::ensure!(
            from_file.from_run.is_some() != from_file.only.is_empty(),
            "the experiment file {}: `from_run` and `only` go together",
            path.display()
        );
        for spec in &mut from_file.toolchain_files {
            if let Some((name, file)) = spec.split_once('=')
                && std::path::Path::new(file).is_relative()
            {
                let beside = path
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join(file);
                *spec = format!("{name}={}", beside.display());
            }
        }
        if let Some(patch) = &mut from_file.patch
            && let Some((name, file)) = patch.split_once('=')
            && file.ends_with(".crate")
            && std::path::Path::new(file).is_relative()
        {
            let beside = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(file);
            *patch = format!("{name}={}", beside.display());
        }
        // Files named in the experiment file are found beside it.
        for named in [&mut from_file.list, &mut from_file.dump]
            .into_iter()
            .flatten()
        {
            if named.is_relative() {
                *named = path
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join(&*named);
            }
        }
        Ok(from_file)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    quarry_infra::telemetry::main("quarry-producer", || run(Cli::parse())).await
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(&cli.config)?;
    let shutdown = quarry_infra::shutdown::on_signal()?;
    match cli.command {
        Command::Republish { run, force } => {
            let republished = quarry_producer::republish(&config, &run, force).await?;
            eprintln!(
                "republished {} jobs of {run}{}",
                republished.jobs,
                if republished.in_hand > 0 {
                    format!(
                        " ({} left alone: live consumers have them in hand)",
                        republished.in_hand
                    )
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            connect(&config).await?;
            eprintln!("database is up to date");
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs => {
            let store = connect(&config).await?;
            let mut out = String::new();
            writeln!(
                out,
                "{:<36}  {:<28}  {:<10}  {:>15}  created",
                "id", "name", "status", "finished/total"
            )?;
            for run in store.runs().await? {
                let progress = store.progress(run.id).await?;
                writeln!(
                    out,
                    "{:<36}  {:<28}  {:<10}  {:>15}  {}",
                    run.id,
                    run.name,
                    status(&run, &progress),
                    format!(
                        "{}/{}",
                        progress.finished,
                        progress
                            .total
                            .map_or_else(|| "?".to_owned(), |t| t.to_string())
                    ),
                    run.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                )?;
            }
            print_out(&out)
        }
        Command::Show { run } => {
            let store = connect(&config).await?;
            let run = store.find_run(&run).await?;
            let progress = store.progress(run.id).await?;
            let mut out = String::new();
            writeln!(out, "run        {} ({})", run.name, run.id)?;
            writeln!(out, "status     {}", status(&run, &progress))?;
            writeln!(out, "created    {}", run.created_at)?;
            writeln!(out, "definition {}", run.definition)?;
            if let Some(summary) = &run.producer_summary {
                writeln!(out, "producer   {summary}")?;
            }
            writeln!(
                out,
                "progress   {} of {} jobs finished ({} recorded)",
                progress.finished,
                progress
                    .total
                    .map_or_else(|| "?".to_owned(), |t| t.to_string()),
                progress.recorded
            )?;
            for (outcome, count) in store.outcome_counts(run.id).await? {
                writeln!(out, "  {:<14} {count}", outcome.as_str())?;
            }
            print_out(&out)
        }
        Command::Consumers { all } => {
            let store = connect(&config).await?;
            let since = if all {
                chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
            } else {
                chrono::Utc::now() - chrono::Duration::hours(1)
            };
            let now = chrono::Utc::now();
            let mut out = String::new();
            writeln!(
                out,
                "{:<24}  {:<36}  {:<8}  {:>9}  {:>9}  in hand",
                "name", "id", "status", "heartbeat", "jobs done"
            )?;
            for member in store.fleet(since).await? {
                let silent = (now - member.heartbeat_at).num_seconds();
                let status = member.state(now);
                let in_hand: Vec<String> =
                    member.current_jobs.iter().map(|j| j.to_string()).collect();
                writeln!(
                    out,
                    "{:<24}  {:<36}  {:<8}  {:>8}s  {:>9}  {}",
                    member.name,
                    member.id,
                    status,
                    silent,
                    member.jobs_done,
                    in_hand.join(",")
                )?;
                // The toolchains it has ready: its own and those it installed on demand.
                for toolchain in &member.toolchains {
                    writeln!(out, "    toolchain {toolchain}")?;
                }
            }
            print_out(&out)
        }
        Command::Requeue { run } => {
            let store = connect(&config).await?;
            let run = store.find_run(&run).await?;
            let broker = quarry_infra::queue::Broker::connect(&config.rabbitmq).await?;
            let requeued = quarry_infra::requeue::requeue_dead_letters(
                &store,
                &broker,
                &run,
                "quarry-producer requeue",
            )
            .await;
            broker.close().await;
            let requeued = requeued?;
            eprintln!(
                "requeued {} dead-lettered jobs of {} ({} messages removed from the dead-letter queue)",
                requeued.jobs, run.name, requeued.dead_letters_removed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { run } => {
            let store = connect(&config).await?;
            let run = store.find_run(&run).await?;
            if store.cancel_run(run.id).await? {
                eprintln!(
                    "run {} cancelled: its remaining jobs will be recorded as skipped",
                    run.name
                );
            } else {
                eprintln!("run {} was already cancelled", run.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let mut args = args.resolve()?;
            let name = args.name.clone().context("a run needs a name")?;
            anyhow::ensure!(
                !args.toolchains.is_empty() || !args.toolchain_files.is_empty(),
                "give the run a toolchain: --toolchain or --toolchain-file"
            );
            let sides = args.toolchains.len()
                + args
                    .toolchain_files
                    .iter()
                    .filter(|spec| {
                        let name = spec.split_once('=').map_or(spec.as_str(), |(n, _)| n);
                        !args.toolchains.iter().any(|t| t.name() == name)
                    })
                    .count();
            anyhow::ensure!(
                sides <= 2,
                "a run compares at most two toolchains (start and end)"
            );
            let mut toolchain_files = Vec::new();
            for spec in &args.toolchain_files {
                let file = quarry_producer::resolve_toolchain_file(&config, spec).await?;
                anyhow::ensure!(
                    !toolchain_files
                        .iter()
                        .any(|f: &quarry_core::job::ToolchainFile| f.name == file.name),
                    "--toolchain-file {} is given twice",
                    file.name
                );
                if !args.toolchains.iter().any(|t| t.name() == file.name) {
                    args.toolchains.push(file.name.parse()?);
                }
                eprintln!(
                    "toolchain {}: {} ({} MiB, sha256 {}) uploaded as s3://{}/{}",
                    file.name,
                    spec.split_once('=').map(|(_, f)| f).unwrap_or(spec),
                    file.bytes >> 20,
                    &file.checksum[..12],
                    config.s3.bucket,
                    file.key
                );
                toolchain_files.push(file);
            }
            anyhow::ensure!(
                (args.mode == Mode::Command) != args.command.is_empty(),
                "--mode command and a command after `--` go together"
            );
            anyhow::ensure!(
                args.toolchains.len() <= 2,
                "a run compares at most two toolchains (start and end)"
            );
            anyhow::ensure!(
                args.patch.is_none() || args.toolchains.len() == 1,
                "--patch takes one --toolchain: the run's two sides are without and with the patch"
            );
            let mut packages = args.packages;
            for spec in &packages {
                quarry_producer::check_package_spec(spec)?;
            }
            if let Some(list) = &args.list {
                packages = quarry_producer::read_package_list(list)?;
            }
            if let Some(earlier) = &args.from_run {
                packages = quarry_producer::packages_from_run(&config, earlier, &args.only).await?;
                anyhow::ensure!(
                    !packages.is_empty(),
                    "run {earlier} has no packages that are {}",
                    args.only
                        .iter()
                        .map(|o| format!("{o:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(" or ")
                );
                eprintln!("taking {} packages from run {earlier}", packages.len());
            }
            let selection = if let Some(path) = &args.dump {
                anyhow::ensure!(
                    path.is_file(),
                    "the database dump {} does not exist",
                    path.display()
                );
                Selection::Dump {
                    // Stored absolute: the run may be resumed from another directory.
                    path: std::path::absolute(path)?,
                    sort: args.sort,
                    limit: args.limit,
                }
            } else if packages.is_empty() {
                Selection::Listing {
                    sort: args.sort,
                    limit: args.limit,
                }
            } else {
                Selection::Packages { packages }
            };
            let filter = Filter {
                all_versions: args.all_versions,
                yanked: args.yanked,
                prereleases: args.prereleases,
                patterns: args.patterns.clone(),
                dependents: args.dependents_of.clone().map(|name| Dependents {
                    name,
                    depth: args.depth,
                }),
                sample: args.sample.map(|size| Sample {
                    size,
                    seed: args.seed,
                }),
            };
            filter.check()?;
            let definition = RunDefinition {
                toolchains: args.toolchains,
                experiment: Experiment {
                    mode: args.mode,
                    timeout_secs: args.timeout,
                    fresh: args.fresh,
                    memory_limit_mb: args.memory_limit,
                    cap_lints: args.cap_lints,
                    command: (!args.command.is_empty()).then(|| args.command.clone()),
                },
                selection,
                filter,
                patch: match &args.patch {
                    Some(spec) => Some(quarry_producer::resolve_patch(&config, spec).await?),
                    None => None,
                },
                toolchain_files,
            };
            let summary = publish_run(&config, &name, &definition, &shutdown).await?;
            eprint!("{summary}");
            // The run id alone on stdout, for scripts.
            println!("{}", summary.run_id);
            if !summary.complete {
                return Ok(ExitCode::from(3));
            }
            if args.wait {
                // The same follower as `quarry-reporter status`: a progress bar with rate and
                // ETA, then the outcomes and where the report is.
                let outcome =
                    quarry_infra::follow::follow(&config, &summary.run_name, &shutdown).await?;
                eprint!("{outcome}");
                if shutdown.is_cancelled() {
                    eprintln!("stopped waiting; the run goes on");
                    return Ok(ExitCode::from(3));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes a command's output to stdout; a closed pipe (`| head`) is not an error.
fn print_out(out: &str) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

async fn connect(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    Ok(store)
}

fn status(
    run: &quarry_infra::store::Run,
    progress: &quarry_core::progress::Progress,
) -> &'static str {
    if run.cancelled_at.is_some() {
        "cancelled"
    } else if progress.is_complete() {
        "finished"
    } else if run.published_at.is_none() {
        "publishing"
    } else {
        "running"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_experiment_file_is_valid() {
        let text = include_str!("../../docs/experiment.example.toml");
        let args: RunArgs = toml::from_str(text).unwrap();
        assert_eq!(args.name.as_deref(), Some("nightly-vs-stable"));
        assert_eq!(args.toolchains.len(), 2);
        assert_eq!(args.mode, Mode::Test);
        assert_eq!((args.limit, args.sort), (Some(1000), Sort::Downloads));
    }
}
