//! `quarry-bench`: benchmarks against the real services (bring them up with `deploy/local/up`).
//! Each prints a markdown table row for BENCHMARKS.md.
//!
//! `dispatch --jobs N`: the pipeline's own overhead. N tiny generated packages, each job a
//! custom command that does nothing (`true`) in the sandbox, through the whole pipeline
//! (producer, broker, two consumers, S3, PostgreSQL), timed from the producer's start to the
//! last result; against `xargs -P2` unpacking each of the same `.crate` files and running the
//! same bubblewrap command line on it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_shared::job::{Experiment, Mode};
use quarry_shared::store::Store;
use quarry_testkit::{TestStack, fixtures};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
enum Bench {
    /// Dispatch overhead: no-op jobs through the pipeline against xargs -P2.
    Dispatch {
        /// Jobs (one generated package each).
        #[arg(long, default_value_t = 5000)]
        jobs: usize,
        /// Consumers (one job at a time each), and xargs's parallelism.
        #[arg(long, default_value_t = 2)]
        consumers: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    quarry_shared::telemetry::init();
    match Bench::parse() {
        Bench::Dispatch { jobs, consumers } => dispatch(jobs, consumers).await,
    }
}

async fn dispatch(jobs: usize, parallel: usize) -> anyhow::Result<()> {
    let crates = tempfile::tempdir()?;
    eprintln!("generating {jobs} packages");
    let corpus = fixtures::synthetic(crates.path(), jobs)?;
    let stack = TestStack::start_with(corpus).await?;

    // The pipeline.
    let names: Vec<String> = (0..parallel).map(|i| format!("bench-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let fleet = stack.start_consumers(&names);
    let definition = RunDefinition {
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Command,
            timeout_secs: 60,
            fresh: false,
            memory_limit_mb: 1024,
            command: Some(vec!["true".to_owned()]),
        },
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: None,
        },
    };
    let store = Store::connect(&stack.config.database).await?;
    let started = Instant::now();
    let summary = publish_run(
        &stack.config,
        "dispatch",
        &definition,
        &CancellationToken::new(),
    )
    .await?;
    let published = started.elapsed();
    loop {
        let progress = store.progress(summary.run_id).await?;
        if progress.is_complete() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pipeline = started.elapsed();
    let stats = fleet.stop().await;
    anyhow::ensure!(
        stats.results == jobs as u64,
        "expected {jobs} results, got {stats:?}"
    );
    eprintln!("pipeline: {pipeline:?} (producer done after {published:?}), {stats:?}");

    // The same sandboxed command over the same packages, with xargs.
    let bare = bare_xargs(crates.path(), parallel).await?;
    eprintln!("xargs -P{parallel}: {bare:?}");
    println!(
        "| dispatch, {jobs} no-op jobs, {parallel} consumers | {:.1} s | {:.1} s | {:.2}× | {:.1} ms |",
        pipeline.as_secs_f64(),
        bare.as_secs_f64(),
        pipeline.as_secs_f64() / bare.as_secs_f64(),
        (pipeline.as_secs_f64() - bare.as_secs_f64()) * 1000.0 * parallel as f64 / jobs as f64,
    );
    Ok(())
}

/// Runs, with `xargs -P<parallel>`, for every `.crate` in `crates`: unpack into a fresh
/// directory, run `true` in the consumer's bubblewrap sandbox there, remove the directory.
async fn bare_xargs(crates: &Path, parallel: usize) -> anyhow::Result<Duration> {
    const PLACE: &str = "/QUARRY_BENCH_DIR";
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".rustup"));
    let sandbox = quarry_consumer::Sandbox::bubblewrap(vec![rustup_home]).await?;
    let (bwrap, args) =
        sandbox.command_line(Path::new(PLACE), &Path::new(PLACE).join("src"), "true", &[]);
    let quoted: Vec<String> = std::iter::once(bwrap.display().to_string())
        .chain(args)
        .map(|arg| {
            if arg.contains(PLACE) {
                format!("\"{}\"", arg.replace(PLACE, "$d"))
            } else {
                format!("'{arg}'")
            }
        })
        .collect();
    let work = tempfile::tempdir()?;
    let script = format!(
        "d=$(mktemp -d -p {work}) && mkdir \"$d/src\" && tar xzf \"$1\" -C \"$d/src\" && {}; \
         status=$?; rm -rf \"$d\"; exit $status",
        quoted.join(" "),
        work = work.path().display(),
    );
    let list: Vec<String> = std::fs::read_dir(crates)?
        .map(|e| Ok(e?.path().display().to_string()))
        .collect::<anyhow::Result<_>>()?;
    let list_file = work.path().join("crates.txt");
    std::fs::write(&list_file, list.join("\n"))?;
    let started = Instant::now();
    let status = tokio::process::Command::new("xargs")
        .arg(format!("-P{parallel}"))
        .args(["-n1", "-a"])
        .arg(&list_file)
        .args(["sh", "-c", &script, "sh"])
        .status()
        .await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(status.success(), "xargs failed: {status}");
    Ok(elapsed)
}
