//! `quarry-bench`: benchmarks against the real services (bring them up with `deploy/local/up`).
//! Each prints a markdown table row for BENCHMARKS.md.
//!
//! `dispatch --jobs N`: the pipeline's own overhead. N tiny generated packages, each job a
//! custom command that does nothing (`true`) in the sandbox, through the whole pipeline
//! (producer, broker, two consumers, S3, PostgreSQL), timed from the producer's start to the
//! last result; against `xargs -P2` unpacking each of the same `.crate` files and running the
//! same bubblewrap command line on it.
//!
//! `check --crates N`: `cargo check` of real crates through the pipeline, cold then warm, against
//! xargs doing the same fetch and sandboxed check. With `--real`, N roots of the real corpus
//! (`deploy/local/corpus.list`, collected by `deploy/local/up`), cold caches only; either way
//! every crate must come to the same outcome both ways. Three bare arms: a fresh target per
//! crate, one target per worker (Crater-style), and one target for every crate checked one at a
//! time (the floor of what sharing compiled units can save). The pipeline's rounds also say
//! what the pool of compiled units did, summed from the jobs' logs.
//! `testkit/bench/cpu-by-program.py` runs it under `perf` and says which programs each arm's
//! CPU went to. Before each arm, the filesystem is written back and left a minute, so that no
//! arm pays for the files the one before it removed (see `settle`).
//!
//! `unpack --archives N`: the CPU time of extracting N `.crate` files of the real corpus with
//! the consumer's `unpack`, against `tar`'s `unpack_in` per entry as cargo extracts.
//!
//! Both take `--rounds R` (each round a fresh stack; a last row gives the medians, as one round
//! varies a lot on a shared machine) and print, for each pipeline run, a timeline from its event
//! log: when the first job started, when the last result came, and how long each consumer's
//! experiments ran out of its working time.
//!
//! `publish --versions N`: the producer's enumeration and publishing. Generates a crates.io
//! database dump of N versions (10 per crate), publishes every version of it with the producer
//! (`run --dump --all-versions`: record in PostgreSQL, publish, wait for confirms, save the
//! position, page after page) and, in the same run, the same messages with a bare lapin loop
//! (publish a page, wait for its confirms). Each runs in its own child process, which reports
//! its peak RSS (VmHWM).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use quarry_core::job::{Experiment, Mode};
use quarry_infra::store::Store;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_testkit::{TestStack, crates_dir, fixtures};
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
        /// Rounds, each a fresh stack and the pipeline then xargs; the summary is the median.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// A real workload: `cargo check` of real crates through the pipeline (twice: cold caches,
    /// then warm), against xargs running the same fetch and sandboxed check.
    Check {
        /// Crates (the first N of the local registry, alphabetically; newest version each).
        #[arg(long, default_value_t = 30)]
        crates: u64,
        /// Consumers (one job at a time each), and xargs's parallelism.
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Rounds, each a fresh stack, its pipeline runs then xargs's; the summary is the median.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Crates of the real corpus instead (N roots of deploy/local/corpus.list spread evenly
        /// over it, at the versions collected), cold caches only.
        #[arg(long)]
        real: bool,
    },
    /// Extracting every `.crate` of the real corpus (else cargo's download cache) with the
    /// consumer's `unpack`, against `tar`'s `unpack_in` per entry, as cargo extracts.
    Unpack {
        /// Rounds, each both ways in turn over the whole set; the summary is the median.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Archives: this many, spread evenly over all of them in name order.
        #[arg(long, default_value_t = 500)]
        archives: usize,
    },
    /// The producer publishing every version of a generated dump, against a bare lapin loop.
    Publish {
        /// Package versions in the generated dump.
        #[arg(long, default_value_t = 2_000_000)]
        versions: u32,
        /// Messages per page (producer) and per batch of confirms (bare loop).
        #[arg(long, default_value_t = 1000)]
        page: usize,
    },
    /// The reporter writing the report of a run of N generated results (two toolchains).
    Report {
        #[arg(long, default_value_t = 1_000_000)]
        results: u64,
    },
    /// (Internal) `report`'s generation, in its own process.
    #[command(hide = true)]
    ReportSide {
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long)]
        output: std::path::PathBuf,
    },
    /// (Internal) one side of `publish`, in its own process.
    #[command(hide = true)]
    PublishSide {
        #[arg(long)]
        side: Side,
        #[arg(long)]
        dump: std::path::PathBuf,
        #[arg(long)]
        versions: u32,
        #[arg(long)]
        page: usize,
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        amqp_url: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Side {
    Producer,
    Bare,
}

/// What one side of `publish` measured, printed by the child as JSON.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measured {
    messages: u64,
    seconds: f64,
    peak_rss_kib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = quarry_infra::telemetry::init("quarry-bench");
    match Bench::parse() {
        Bench::Dispatch {
            jobs,
            consumers,
            rounds,
        } => {
            print_temporary_place();
            let mut measured = Vec::new();
            for _ in 0..rounds {
                measured.push(dispatch(jobs, consumers).await?);
            }
            summarize(&format!("dispatch, {jobs} no-op jobs"), &measured);
            Ok(())
        }
        Bench::Check {
            crates,
            consumers,
            rounds,
            real,
        } => {
            print_temporary_place();
            let (mut cold, mut warm) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let measured = check(crates, consumers, real).await?;
                cold.push(measured[0]);
                warm.extend(measured.get(1).copied());
            }
            let which = if real { "real corpus crates" } else { "crates" };
            summarize(&format!("check, {crates} {which}, cold caches"), &cold);
            if !warm.is_empty() {
                summarize(&format!("check, {crates} {which}, warm caches"), &warm);
            }
            Ok(())
        }
        Bench::Unpack { rounds, archives } => {
            print_temporary_place();
            let archives = archives_to_unpack(archives)?;
            let mut measured = Vec::new();
            for _ in 0..rounds {
                measured.push(unpack_both_ways(&archives)?);
            }
            summarize("unpack, every archive of the corpus", &measured);
            Ok(())
        }
        Bench::Publish { versions, page } => publish(versions, page).await,
        Bench::Report { results } => report(results).await,
        Bench::ReportSide { config, output } => {
            let config = quarry_infra::Config::from_file(&config)?;
            let started = Instant::now();
            let written = quarry_reporter::generate(&config, "report-bench", &output).await?;
            let measured = Measured {
                messages: written.report.packages.len() as u64,
                seconds: started.elapsed().as_secs_f64(),
                peak_rss_kib: peak_rss_kib()?,
            };
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        Bench::PublishSide {
            side,
            dump,
            versions,
            page,
            database_url,
            amqp_url,
        } => {
            let mut config = quarry_infra::Config::default();
            config.database.url = quarry_infra::config::Secret::new(database_url);
            config.rabbitmq.url = quarry_infra::config::Secret::new(amqp_url);
            config.registry.dump_page_size = page;
            let started = Instant::now();
            let messages = match side {
                Side::Producer => publish_with_producer(&config, &dump).await?,
                Side::Bare => publish_bare(&config, versions, page).await?,
            };
            let measured = Measured {
                messages,
                seconds: started.elapsed().as_secs_f64(),
                peak_rss_kib: peak_rss_kib()?,
            };
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
    }
}

/// `count` archives of the real corpus (else of cargo's download cache), spread evenly over
/// them in name order, read into memory: (package root, bytes).
fn archives_to_unpack(count: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let dir = match quarry_testkit::real_corpus_dir() {
        Ok(corpus) => corpus.join("crates"),
        Err(_) => crates_dir(),
    };
    let mut archives = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else if let Some(root) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".crate"))
            {
                archives.push((root.to_owned(), path));
            }
        }
    }
    anyhow::ensure!(!archives.is_empty(), "no .crate files in {}", dir.display());
    archives.sort();
    let step = (archives.len() as f64 / count.max(1) as f64).max(1.0);
    let archives = (0..count.min(archives.len()))
        .map(|i| {
            let (root, path) = &archives[(i as f64 * step) as usize];
            Ok((root.clone(), std::fs::read(path)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bytes: usize = archives.iter().map(|(_, archive)| archive.len()).sum();
    eprintln!(
        "{} archives ({} MiB) from {}",
        archives.len(),
        bytes >> 20,
        dir.display()
    );
    Ok(archives)
}

/// One round of `unpack`: the CPU time (user and system) of extracting every archive with the
/// consumer's `unpack`, then with `unpack_in` per entry. Both write under `TMPDIR`; what they
/// wrote is removed between the two, untimed, and the filesystem settled before each.
fn unpack_both_ways(archives: &[(String, Vec<u8>)]) -> anyhow::Result<(Duration, Duration)> {
    let cpu = || -> anyhow::Result<Duration> {
        let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)?;
        let seconds = |t: nix::sys::time::TimeVal| {
            Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
        };
        Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
    };
    let mut refused = 0;
    settle();
    let into = tempfile::tempdir()?;
    let before = cpu()?;
    for (n, (root, archive)) in archives.iter().enumerate() {
        let place = into.path().join(n.to_string());
        if quarry_consumer::unpack::unpack(archive, &place, root).is_err() {
            refused += 1;
        }
    }
    let ours = cpu()? - before;
    drop(into);
    settle();
    let into = tempfile::tempdir()?;
    let before = cpu()?;
    for (n, (root, archive)) in archives.iter().enumerate() {
        let place = into.path().join(n.to_string());
        std::fs::create_dir_all(&place)?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&archive[..]));
        tar.set_preserve_permissions(false);
        tar.set_mask(0o022);
        for entry in tar.entries()? {
            let mut entry = entry?;
            if entry.path()?.starts_with(root) && entry.unpack_in(&place).is_err() {
                break;
            }
        }
    }
    let theirs = cpu()? - before;
    drop(into);
    eprintln!("unpack: {ours:?} CPU ({refused} refused); unpack_in per entry: {theirs:?} CPU");
    Ok((ours, theirs))
}

/// One round of `dispatch`: the pipeline's time and xargs's.
async fn dispatch(jobs: usize, parallel: usize) -> anyhow::Result<(Duration, Duration)> {
    let crates = tempfile::tempdir()?;
    eprintln!("generating {jobs} packages");
    let corpus = fixtures::synthetic(crates.path(), jobs)?;
    let stack = TestStack::start_with(corpus).await?;

    // The pipeline.
    let names: Vec<String> = (0..parallel).map(|i| format!("bench-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let fleet = stack.start_consumers(&names);
    let definition = quarry_testkit::no_op_run();
    let store = Store::connect(&stack.config.database).await?;
    eprintln!("pipeline: starting the run");
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
    eprintln!("{}", timeline(&stack.sql().await?, summary.run_id).await?);
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
    Ok((pipeline, bare))
}

/// Says where both sides keep their temporary files (scratch directories, caches, the S3
/// server's objects): `TMPDIR`. File creation there weighs on both, and how much depends on
/// the filesystem (BENCHMARKS.md).
fn print_temporary_place() {
    let dir = std::env::temp_dir();
    // The mount holding it: the longest mount point that is a prefix of it.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let filesystem = mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (point, kind) = (*fields.get(1)?, *fields.get(2)?);
            dir.starts_with(point)
                .then(|| (point.len(), format!("{kind} on {point}")))
        })
        .max()
        .map(|(_, described)| described)
        .unwrap_or_else(|| "unknown filesystem".to_owned());
    eprintln!(
        "temporary files of both sides: {} ({filesystem})",
        dir.display()
    );
}

/// Prints the median of rounds of (pipeline, bare) times, and every round's ratio.
fn summarize(what: &str, rounds: &[(Duration, Duration)]) {
    if rounds.len() < 2 {
        return;
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        if values.len().is_multiple_of(2) {
            (values[middle - 1] + values[middle]) / 2.0
        } else {
            values[middle]
        }
    };
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|(pipeline, bare)| pipeline.as_secs_f64() / bare.as_secs_f64())
        .collect();
    println!(
        "| {what}, median of {} rounds | {:.1} s | {:.1} s | {:.3}× (rounds: {}) |",
        rounds.len(),
        median(rounds.iter().map(|r| r.0.as_secs_f64()).collect()),
        median(rounds.iter().map(|r| r.1.as_secs_f64()).collect()),
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.3}×"))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

/// One round of `check`: the pipeline's and xargs's times with cold caches, then warm.
async fn check(
    count: u64,
    parallel: usize,
    real: bool,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let corpus = if real {
        quarry_testkit::real_corpus()?
    } else {
        quarry_registry::Corpus::load(&[crates_dir()])?.closed()
    };
    let selection = if real {
        Selection::Packages {
            packages: corpus_roots(count)?,
        }
    } else {
        Selection::Listing {
            sort: Sort::Alpha,
            limit: Some(count),
        }
    };
    let stack = TestStack::start_with(corpus.clone()).await?;
    let store = Store::connect(&stack.config.database).await?;
    let definition = |fresh| RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: Experiment {
            mode: Mode::Check,
            timeout_secs: 600,
            fresh,
            memory_limit_mb: 2048,
            cap_lints: None,
            command: None,
        },
        selection: selection.clone(),
        toolchain_files: Vec::new(),
    };
    // A fleet that is already up when the run starts, as in production, keeping each job's
    // prepared package: bare cargo checks the same directories.
    let work = tempfile::tempdir()?;
    let kept = work.path().join("kept");
    let fleet = quarry_testkit::Consumers::start((0..parallel).map(|i| {
        let mut config = stack.consumer_config(&format!("check-{i}"));
        config.consumer.keep_packages = Some(kept.clone());
        config
    }));
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut pipeline = Vec::new();
    let mut packages = Vec::new();
    // What the pipeline's first round came to, by kept package: for the comparison with xargs.
    let mut outcomes_by_file = std::collections::BTreeMap::new();
    let rounds: &[(&str, bool)] = &[("cold", false), ("warm", true)];
    let mut pipeline_cpu = Vec::new();
    for &(round, fresh) in rounds {
        let before = stack.registry.stats();
        calibrate(&format!("pipeline, {round}"));
        let cpu_before = machine_cpu_seconds()?;
        let started = Instant::now();
        let summary = publish_run(
            &stack.config,
            &format!("check-{round}"),
            &definition(fresh),
            &CancellationToken::new(),
        )
        .await?;
        loop {
            if store.progress(summary.run_id).await?.is_complete() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed();
        eprintln!("{ARM_FINISHED}pipeline, {round}");
        let cpu = machine_cpu_seconds()? - cpu_before;
        let after = stack.registry.stats();
        let database = stack.sql().await?;
        let recorded: f64 = database
            .query_one(
                "SELECT coalesce(sum(cpu_ms), 0)::float8 / 1000 FROM results WHERE run_id = $1",
                &[&summary.run_id.0],
            )
            .await?
            .get(0);
        pipeline_cpu.push((cpu, recorded));
        // Where the jobs' CPU went, step by step (fetch, refetch, check).
        let steps = database
            .query(
                "SELECT s->>'name', coalesce(sum((s->>'cpu_ms')::float8), 0) / 1000, count(*)
                 FROM results r, jsonb_array_elements(r.steps) s
                 WHERE r.run_id = $1 GROUP BY 1 ORDER BY 1",
                &[&summary.run_id.0],
            )
            .await?
            .iter()
            .map(|row| {
                format!(
                    "{} {:.1} CPU-s ({} steps)",
                    row.get::<_, String>(0),
                    row.get::<_, f64>(1),
                    row.get::<_, i64>(2)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!("pipeline, {round}: the jobs' steps: {steps}");
        eprintln!("{}", timeline(&database, summary.run_id).await?);
        let outcomes = database
            .query(
                "SELECT r.outcome, count(*) FROM results r WHERE r.run_id = $1 GROUP BY 1 ORDER BY 1",
                &[&summary.run_id.0],
            )
            .await?
            .iter()
            .map(|row| format!("{} {}", row.get::<_, String>(0), row.get::<_, i64>(1)))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = database
            .query(
                "SELECT j.crate_name, j.crate_version, r.outcome, j.id FROM jobs j
                 JOIN results r ON r.job_id = j.id WHERE j.run_id = $1",
                &[&summary.run_id.0],
            )
            .await?;
        // What failed, and why: the tail of each failed job's log.
        let written = quarry_reporter::generate(
            &stack.config,
            &format!("check-{round}"),
            &work.path().join("reports"),
        )
        .await?;
        // What the pool did, from each job's last log line.
        let mut units = [0u64; 4];
        for row in &written.report.packages {
            let log = written.read_log(row.log.as_deref()).unwrap_or_default();
            for (total, count) in units.iter_mut().zip(pool_counts(&log)) {
                *total += count;
            }
        }
        eprintln!(
            "pipeline, {round}: compiled units {} reused from the pool, {} added; build script \
             runs {} reused, {} added",
            units[0], units[1], units[2], units[3]
        );
        for row in written
            .report
            .packages
            .iter()
            .filter(|p| p.outcome != "build-pass")
        {
            let log = written.read_log(row.log.as_deref()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "{round}: {}@{} {}:\n  {}",
                row.name,
                row.version,
                row.outcome,
                lines[lines.len().saturating_sub(12)..].join("\n  ")
            );
        }
        // The bare arms check the packages the first round prepared.
        if round == "cold" {
            for row in rows {
                let (name, version, outcome, job): (String, String, String, uuid::Uuid) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let path = kept.join(job.to_string()).join(format!("{name}-{version}"));
                outcomes_by_file.insert(path.display().to_string(), outcome);
                packages.push(path);
            }
        }
        eprintln!(
            "pipeline, {round}: {elapsed:?}, {outcomes}; registry: {} downloads, {} bytes; \
             {cpu:.1} CPU-s on the machine, {recorded:.1} CPU-s recorded by the jobs",
            after.downloads - before.downloads,
            after.download_bytes - before.download_bytes
        );
        pipeline.push((elapsed, after.download_bytes - before.download_bytes));
    }
    let stats = fleet.stop().await;
    eprintln!("{stats:?}");

    // The same packages with xargs, each in a copy of the directory the pipeline prepared (its
    // manifest as Quarry repaired it, the lockfile cargo resolved): fetch outside the sandbox,
    // check inside. Each arm has a cargo home of its own, made new for it, so that every arm
    // downloads and extracts its sources as Quarry's cold round does (and as Crater does once
    // per run). An arm that found the previous arm's home filled would not pay for them; one
    // that emptied it first would pay the removal's freed inodes in its own file creations.
    let index = &stack.config.registry.index_url;
    let cargo_bin = quarry_consumer::find_on_path("cargo")
        .and_then(|cargo| cargo.parent().map(std::path::PathBuf::from))
        .context("cargo is not on PATH")?;
    let toolchain = quarry_testkit::toolchain().to_string();
    let plus = format!("+{toolchain}");
    // The arm's cargo home, the sandbox that sees it, and the environment that names it.
    let home_for = |arm: usize| -> anyhow::Result<(std::path::PathBuf, String)> {
        let home = work.path().join(format!("cargo-home-{arm}"));
        std::fs::create_dir_all(&home)?;
        std::fs::write(
            home.join("config.toml"),
            format!(
                "[source.crates-io]\nreplace-with = \"bench\"\n\
                 [source.bench]\nregistry = \"sparse+{index}\"\n"
            ),
        )?;
        let env = format!(
            "env -i PATH='{}:/usr/bin:/bin' HOME=\"$d\" CARGO_HOME='{}' RUSTUP_HOME='{}' \
             RUSTUP_TOOLCHAIN='{toolchain}' CARGO_TARGET_DIR=\"$d/target\" CARGO_TERM_COLOR=never \
             CARGO_INCREMENTAL=0",
            cargo_bin.display(),
            home.display(),
            rustup_home()?.display(),
        );
        Ok((home, env))
    };
    // Two bare baselines: a fresh target directory per crate, and one per worker kept across
    // its crates as Crater does (moved into the crate's directory for its check, so that the
    // sandbox's one writable place holds it, and back after).
    let script = |kept_target: bool,
                  workers: usize,
                  arm: usize,
                  env: &str,
                  sandbox: &quarry_consumer::Sandbox| {
        let (take, give_back) = if kept_target {
            (
                format!(
                    "for i in $(seq 0 {last}); do mkdir \"{work}/lock-$i\" 2>/dev/null && \
                     {{ slot=$i; break; }}; done; mkdir -p \"{work}/target-{arm}-$slot\" && \
                     mv \"{work}/target-{arm}-$slot\" \"$d/target\";",
                    last = workers - 1,
                    work = work.path().display(),
                ),
                format!(
                    "mv \"$d/target\" \"{work}/target-{arm}-$slot\"; rmdir \"{work}/lock-$slot\";",
                    work = work.path().display(),
                ),
            )
        } else {
            (String::new(), String::new())
        };
        format!(
            "d=$(mktemp -d -p {work}) && cp -a \"$1\" \"$d/src\" && {take} \
             {{ (cd \"$d/src\" && {env} cargo {plus} fetch -q >/dev/null 2>&1) || \
                {{ echo \"fetch $1\" >> {work}/statuses; {give_back} rm -rf \"$d\"; exit 0; }}; }} && \
             (cd \"$d/src\" && {env} {check} >/dev/null 2>&1); \
             echo \"$? $1\" >> {work}/statuses; {give_back} rm -rf \"$d\"; exit 0",
            work = work.path().display(),
            check = sandboxed(sandbox, "cargo", &[&plus, "check", "--frozen"]),
        )
    };
    let mut bare = Vec::new();
    let mut differ = Vec::new();
    // The third arm is the floor of sharing: one target directory for every crate, one crate
    // at a time (cargo still runs two rustc at once), so that each distinct unit is compiled
    // exactly once in the whole arm. No pool can share more than that; its CPU-seconds say how
    // far below the fresh arm any arm can get on these crates.
    let arms: &[(&str, bool, usize)] = &[
        ("fresh target per crate", false, parallel),
        ("one target per worker", true, parallel),
        ("one target for all crates, one at a time", true, 1),
    ];
    for (i, &(arm, kept_target, workers)) in arms.iter().enumerate() {
        let (home, env) = home_for(i)?;
        let sandbox = quarry_consumer::Sandbox::bubblewrap(vec![
            rustup_home()?,
            cargo_bin.clone(),
            home.clone(),
        ])
        .await?;
        let script = script(kept_target, workers, i, &env, &sandbox);
        calibrate(&format!("xargs -P{workers}, {arm}"));
        let cpu_before = machine_cpu_seconds()?;
        let elapsed = xargs(&packages, workers, &script, work.path()).await?;
        eprintln!("{ARM_FINISHED}xargs -P{workers}, {arm}");
        let cpu = machine_cpu_seconds()? - cpu_before;
        let statuses = std::fs::read_to_string(work.path().join("statuses"))?;
        for line in statuses.lines() {
            let Some((status, file)) = line.split_once(' ') else {
                continue;
            };
            let bare_outcome = match status {
                "0" => "build-pass",
                "fetch" => "broken",
                _ => "build-fail",
            };
            let pipeline_outcome = outcomes_by_file.get(file).map_or("none", String::as_str);
            if pipeline_outcome != bare_outcome {
                differ.push(format!(
                    "{file}: pipeline {pipeline_outcome}, bare cargo ({arm}) {bare_outcome}"
                ));
            }
        }
        let failed: Vec<&str> = statuses
            .lines()
            .filter(|line| !line.starts_with("0 "))
            .collect();
        eprintln!(
            "xargs -P{workers}, {arm}: {elapsed:?}, {cpu:.1} CPU-s on the machine, {} of {} \
             passed; failed: {failed:?}",
            packages.len() - failed.len(),
            packages.len()
        );
        std::fs::remove_file(work.path().join("statuses"))?;
        bare.push((elapsed, cpu));
    }
    let which = if real {
        "crates of the real corpus"
    } else {
        "real crates"
    };
    let crates = packages.len().max(1) as f64;
    let (fresh, crater) = (bare[0], bare[1]);
    for (i, round) in ["cold caches", "again, fresh results"].iter().enumerate() {
        let (elapsed, bytes) = pipeline[i];
        let (cpu, recorded) = pipeline_cpu[i];
        println!(
            "| check, {count} {which}, {parallel} consumers, {round} | {:.1} s | {:.1} CPU-s ({:.2} per crate; jobs recorded {recorded:.1}) | {:.3}× fresh, {:.3}× Crater-style | {bytes} B |",
            elapsed.as_secs_f64(),
            cpu,
            cpu / crates,
            elapsed.as_secs_f64() / fresh.0.as_secs_f64(),
            elapsed.as_secs_f64() / crater.0.as_secs_f64(),
        );
    }
    for (&(arm, _, workers), (elapsed, cpu)) in arms.iter().zip(&bare) {
        println!(
            "| check, {count} {which}, bare cargo, xargs -P{workers}, {arm} | {:.1} s | {cpu:.1} CPU-s ({:.2} per crate, {:.3}× fresh) | | |",
            elapsed.as_secs_f64(),
            cpu / crates,
            cpu / fresh.1,
        );
    }
    eprintln!(
        "outcomes: {} crates, {} the same both ways",
        outcomes_by_file.len(),
        outcomes_by_file.len() - differ.len()
    );
    anyhow::ensure!(
        differ.is_empty(),
        "{} crates came to another outcome through the pipeline than with bare cargo:\n{}",
        differ.len(),
        differ.join("\n")
    );
    // Cold against the fresh arm, again against the Crater-style one (each from an empty cargo
    // home of its own).
    Ok(vec![(pipeline[0].0, fresh.0), (pipeline[1].0, crater.0)])
}

/// The four counts of a job log's line about the pool of compiled units ("quarry: dependencies'
/// compiled units: N reused from the pool, M added to it; build script runs: A reused, B
/// added"); zeros where the job has none.
fn pool_counts(log: &str) -> [u64; 4] {
    let Some(line) = log
        .lines()
        .rev()
        .find(|line| line.starts_with("quarry: dependencies' compiled units:"))
    else {
        return [0; 4];
    };
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect();
    std::array::from_fn(|i| numbers.get(i).copied().unwrap_or(0))
}

/// CPU time the whole machine has spent so far (user, nice, system, interrupts, steal), from
/// `/proc/stat`: the arms of a benchmark run one after another on an otherwise idle machine, so
/// the difference over an arm is what it cost, services and all.
/// How fast this machine is just before `arm`: the seconds one thread takes to hash 1 GiB,
/// printed. The arms run one after another for the best part of an hour, and a shared machine's
/// speed drifts in that time (the same bare arm has taken 25% less CPU an hour later): a ratio
/// between two arms means something only where their calibrations agree.
/// What the bench prints when an arm's measured part ends (`cpu-by-program.py` stops counting
/// the arm there: the settling and calibration before the next are no arm's).
const ARM_FINISHED: &str = "arm finished: ";

fn calibrate(arm: &str) {
    use sha2::Digest as _;
    settle();
    let block = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut hash = sha2::Sha256::new();
    for _ in 0..1024 {
        hash.update(&block);
    }
    std::hint::black_box(hash.finalize());
    eprintln!(
        "calibration before {arm}: sha256 of 1 GiB in {:.3} s",
        started.elapsed().as_secs_f64()
    );
}

/// Lets the filesystem forget what the arm before removed, so that no arm pays for another's
/// files. On ext4 without a journal (this project's benchmark machines), creating a file scans
/// the inodes of its group freed in the last minute (five, while their inode table is not yet
/// written back) before it takes one; an arm that starts right after another removed its
/// hundreds of thousands of files would pay for them. So: write everything back, then wait
/// that minute out.
fn settle() {
    const FORGOTTEN: Duration = Duration::from_secs(61);
    nix::unistd::sync();
    std::thread::sleep(FORGOTTEN);
}

fn machine_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // USER_HZ is 100 on Linux (what `getconf CLK_TCK` prints).
    Ok(busy as f64 / 100.0)
}

/// `count` roots of the real corpus's list, spread evenly over it, as `name@version`.
fn corpus_roots(count: u64) -> anyhow::Result<Vec<String>> {
    let list = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/corpus.list"),
    )?;
    let roots = quarry_registry::collect::read_list(&list)?;
    let count = (count as usize).min(roots.len());
    Ok((0..count)
        .map(|i| roots[i * roots.len() / count].to_string())
        .collect())
}

/// Where a run's time went, from its event log: how long after the run was created the first
/// job started and the last result was written, and, per consumer, how much of the time from
/// its first start to its last result its experiments were running.
async fn timeline(
    database: &tokio_postgres::Client,
    run: quarry_core::job::RunId,
) -> anyhow::Result<String> {
    let row = database
        .query_one(
            "SELECT extract(epoch FROM (SELECT min(at) FROM job_events
                        WHERE run_id = r.id AND kind = 'started') - r.created_at)::float8,
                    extract(epoch FROM (SELECT max(finished_at) FROM results
                        WHERE run_id = r.id) - r.created_at)::float8
             FROM runs r WHERE r.id = $1",
            &[&run.0],
        )
        .await?;
    let (first, last): (Option<f64>, Option<f64>) = (row.get(0), row.get(1));
    let consumers = database
        .query(
            "SELECT consumer, count(*), sum(duration_ms)::float8 / 1000,
                    extract(epoch FROM max(finished_at) - (SELECT min(e.at) FROM job_events e
                        WHERE e.run_id = $1 AND e.kind = 'started' AND e.consumer = r.consumer))::float8
             FROM results r WHERE run_id = $1 GROUP BY consumer ORDER BY consumer",
            &[&run.0],
        )
        .await?
        .iter()
        .map(|row| {
            let (name, jobs, running, span): (String, i64, f64, Option<f64>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            format!(
                "{name}: {jobs} jobs, running {running:.2} s of {:.2} s",
                span.unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    // How each consumer's share ended: a job that waited for its slot while the other
    // consumer had nothing left is the end of a run idling.
    let ends = database
        .query(
            "SELECT consumer, crate_name, started, finished, slot_wait FROM (
                 SELECT r.consumer, j.crate_name,
                        extract(epoch FROM (SELECT max(e.at) FROM job_events e
                            WHERE e.job_id = r.job_id AND e.kind = 'started') - ru.created_at)::float8
                            AS started,
                        extract(epoch FROM r.finished_at - ru.created_at)::float8 AS finished,
                        r.slot_wait_ms::float8 / 1000 AS slot_wait,
                        row_number() OVER (PARTITION BY r.consumer ORDER BY r.finished_at DESC) AS n
                 FROM results r JOIN jobs j ON j.id = r.job_id JOIN runs ru ON ru.id = r.run_id
                 WHERE r.run_id = $1) last
             WHERE n <= 3 ORDER BY consumer, finished",
            &[&run.0],
        )
        .await?
        .iter()
        .map(|row| {
            let (consumer, name, started, finished, wait): (
                String,
                String,
                Option<f64>,
                f64,
                Option<f64>,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            format!(
                "{consumer} {name} {:.1}-{finished:.1} s (waited {:.1} s for its slot)",
                started.unwrap_or_default(),
                wait.unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(format!(
        "timeline: first job started after {:.3} s, last result after {:.3} s; {consumers}\n\
         timeline, the last jobs: {ends}",
        first.unwrap_or_default(),
        last.unwrap_or_default()
    ))
}

/// Generates a finished two-toolchain run of `results` results in the database (server-side,
/// with `generate_series`): mostly passing, a few percent failing on both toolchains with
/// compiler errors, some regressing on the second, some timeouts, each with a short log kept in
/// PostgreSQL. Then times `generate` in a child process that reports its peak RSS.
async fn report(results: u64) -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let store = Store::connect(&stack.config.database).await?;
    store.migrate().await?;
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec!["1.94.0".parse()?, "1.95.0".parse()?],
        experiment: Experiment {
            mode: Mode::Check,
            timeout_secs: 600,
            fresh: false,
            memory_limit_mb: 1024,
            cap_lints: None,
            command: None,
        },
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: None,
        },
        toolchain_files: Vec::new(),
    };
    let packages = (results / 2) as i64;
    let run = uuid::Uuid::new_v4();
    let database = stack.sql().await?;
    let started = Instant::now();
    database
        .execute(
            "INSERT INTO runs (id, name, definition, published_at, jobs_total)
             VALUES ($1, 'report-bench', $2, now(), $3)",
            &[&run, &serde_json::to_value(&definition)?, &(packages * 2)],
        )
        .await?;
    database
        .execute(
            "INSERT INTO jobs (id, run_id, crate_name, crate_version, checksum, side, published_at)
             SELECT md5($3 || i || t)::uuid, $1, 'bench-crate-' || i, '1.0.' || (i % 7),
                    md5(i::text), t, now()
             FROM generate_series(0, $2::bigint - 1) AS i, unnest(ARRAY['1.94.0', '1.95.0']) AS t",
            &[&run, &packages, &run.to_string()],
        )
        .await?;
    database
        .execute(
            "INSERT INTO results (job_id, run_id, outcome, exit_code, duration_ms, attempt, consumer, log)
             SELECT id, run_id, outcome,
                    CASE WHEN outcome = 'build-pass' THEN 0 WHEN outcome = 'timeout' THEN NULL ELSE 101 END,
                    1000 + n % 60000, 1, 'consumer-' || n % 16,
                    '$ cargo +' || toolchain || E' check --frozen\n' ||
                    CASE outcome
                      WHEN 'build-pass' THEN E'    Finished `dev` profile\n'
                      WHEN 'timeout' THEN E'quarry: killed after the time limit\n'
                      WHEN 'test-fail' THEN E'test tests::it_works ... FAILED\n'
                      ELSE CASE WHEN n % 3 = 0
                        THEN E'error: could not compile `bench-crate-7` (lib) due to 1 previous error\n'
                        ELSE E'error[E0308]: mismatched types\n --> src/lib.rs:1:1\n' END
                    END
             FROM (SELECT j.id, j.run_id, j.side,
                          substring(j.crate_name from 13)::bigint AS n,
                          CASE
                            WHEN substring(j.crate_name from 13)::bigint % 40 = 0 THEN 'build-fail'
                            WHEN substring(j.crate_name from 13)::bigint % 97 = 0 THEN 'test-fail'
                            WHEN substring(j.crate_name from 13)::bigint % 211 = 0
                                 AND j.side = '1.95.0' THEN 'build-fail'
                            WHEN substring(j.crate_name from 13)::bigint % 503 = 0 THEN 'timeout'
                            ELSE 'build-pass'
                          END AS outcome
                   FROM jobs j WHERE j.run_id = $1) AS generated",
            &[&run],
        )
        .await?;
    // What the index would have told the producer: every crate from the thousandth on depends
    // on one of the first thousand, which the report ranks regressions by.
    database
        .execute(
            "INSERT INTO dependencies (run_id, dependency, crate_name)
             SELECT $1, 'bench-crate-' || (i % 1000), 'bench-crate-' || i
             FROM generate_series(1000, $2::bigint - 1) AS i",
            &[&run, &packages],
        )
        .await?;
    database
        .batch_execute("ANALYZE jobs; ANALYZE results; ANALYZE dependencies")
        .await?;
    eprintln!(
        "generated {} results in {:?}",
        packages * 2,
        started.elapsed()
    );

    let config_file = stack.dir.path().join("reporter.toml");
    std::fs::write(&config_file, toml::to_string(&stack.config)?)?;
    let output = stack.dir.path().join("reports");
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("report-side")
        .arg("--config")
        .arg(&config_file)
        .arg("--output")
        .arg(&output)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(child.status.success(), "the report failed");
    let measured: Measured = serde_json::from_slice(&child.stdout)?;
    let size = dir_size(&output.join("report-bench"))?;
    let summary = std::fs::read_to_string(output.join("report-bench/summary.md"))?;
    println!(
        "| report, {} generated results, two toolchains | {:.1} s | {} MiB peak RSS | {} MiB written | summary.md {} characters |",
        measured.messages,
        measured.seconds,
        measured.peak_rss_kib / 1024,
        size >> 20,
        summary.chars().count()
    );
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        total += if metadata.is_dir() {
            dir_size(&entry.path())?
        } else {
            metadata.len()
        };
    }
    Ok(total)
}

fn rustup_home() -> anyhow::Result<std::path::PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(std::env::var_os("RUSTUP_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".rustup")))
}

/// A job's directory in the shell scripts below: `$d`, made by `mktemp`.
const PLACE: &str = "/QUARRY_BENCH_DIR";

/// The consumer's bubblewrap command line for `program args`, run in `$d/src` with `$d`
/// writable, as shell words.
fn sandboxed(sandbox: &quarry_consumer::Sandbox, program: &str, args: &[&str]) -> String {
    let mounts = quarry_consumer::Mounts::only(Path::new(PLACE));
    let (bwrap, line) = sandbox.command_line(
        &mounts,
        &Path::new(PLACE).join("src"),
        program,
        args,
        None,
        false,
    );
    std::iter::once(bwrap.display().to_string())
        .chain(line)
        .map(|arg| {
            if arg.contains(PLACE) {
                format!("\"{}\"", arg.replace(PLACE, "$d"))
            } else {
                format!("'{arg}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs, with `xargs -P<parallel>`, for every `.crate` in `crates`: unpack into a fresh
/// directory, run `true` in the consumer's bubblewrap sandbox there, remove the directory.
async fn bare_xargs(crates: &Path, parallel: usize) -> anyhow::Result<Duration> {
    let sandbox = quarry_consumer::Sandbox::bubblewrap(vec![rustup_home()?]).await?;
    let work = tempfile::tempdir()?;
    let script = format!(
        "d=$(mktemp -d -p {work}) && mkdir \"$d/src\" && tar xzf \"$1\" -C \"$d/src\" && {}; \
         status=$?; rm -rf \"$d\"; exit $status",
        sandboxed(&sandbox, "true", &[]),
        work = work.path().display(),
    );
    let list: Vec<std::path::PathBuf> = std::fs::read_dir(crates)?
        .map(|e| Ok(e?.path()))
        .collect::<anyhow::Result<_>>()?;
    let elapsed = xargs(&list, parallel, &script, work.path()).await?;
    Ok(elapsed)
}

/// Runs `sh -c script` once per file of `list` (as `$1`), `parallel` at a time; the time taken.
async fn xargs(
    list: &[std::path::PathBuf],
    parallel: usize,
    script: &str,
    work: &Path,
) -> anyhow::Result<Duration> {
    let list: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
    let list_file = work.join("crates.txt");
    std::fs::write(&list_file, list.join("\n"))?;
    let started = Instant::now();
    let status = tokio::process::Command::new("xargs")
        .arg(format!("-P{parallel}"))
        .args(["-n1", "-a"])
        .arg(&list_file)
        .args(["sh", "-c", script, "sh"])
        .status()
        .await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(status.success(), "xargs failed: {status}");
    Ok(elapsed)
}

/// The name, version and checksum of the `i`-th version of a generated registry: ten versions per
/// crate, as on crates.io on average.
fn generated_version(i: u32) -> (String, String, String) {
    use sha2::Digest as _;
    let name = format!("bench-crate-{:07}", i / 10);
    let version = format!("1.{}.0", i % 10);
    let checksum = hex::encode(sha2::Sha256::digest(format!("{name}@{version}")));
    (name, version, checksum)
}

async fn publish(versions: u32, page: usize) -> anyhow::Result<()> {
    let stack = TestStack::start_with(quarry_registry::Corpus::default()).await?;
    let dump = stack.dir.path().join("db-dump.tar.gz");
    let started = Instant::now();
    let mut writer = quarry_registry::dump::DumpWriter::new()?;
    for i in 0..versions {
        let (name, version, checksum) = generated_version(i);
        if i % 10 == 0 {
            writer.add_crate(i / 10 + 1, &name, u64::from(versions - i))?;
        }
        writer.add_version(i + 1, i / 10 + 1, &version, false, &checksum)?;
    }
    writer.finish(&dump, "2026-11-23T02:00:00Z")?;
    eprintln!(
        "generated a dump of {versions} versions ({} MB) in {:.1?}",
        std::fs::metadata(&dump)?.len() / 1_000_000,
        started.elapsed()
    );

    let side = |side: &str| -> anyhow::Result<Measured> {
        let output = std::process::Command::new(std::env::current_exe()?)
            .args(["publish-side", "--side", side, "--dump"])
            .arg(&dump)
            .args(["--versions", &versions.to_string()])
            .args(["--page", &page.to_string()])
            .args(["--database-url", stack.config.database.url.expose()])
            .args(["--amqp-url", stack.config.rabbitmq.url.expose()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(output.status.success(), "the {side} side failed");
        Ok(serde_json::from_slice(&output.stdout)?)
    };
    let producer = side("producer")?;
    eprintln!("producer: {producer:?}");
    let bare = side("bare")?;
    eprintln!("bare lapin loop: {bare:?}");
    anyhow::ensure!(
        producer.messages == u64::from(versions) && bare.messages == u64::from(versions),
        "both sides publish every version"
    );
    let rate = |m: &Measured| m.messages as f64 / m.seconds;
    println!(
        "| publish, {versions} versions from a dump | {:.0} jobs/s, {} MiB | {:.0} msg/s, {} MiB | {:.0}% |",
        rate(&producer),
        producer.peak_rss_kib / 1024,
        rate(&bare),
        bare.peak_rss_kib / 1024,
        100.0 * rate(&producer) / rate(&bare),
    );
    Ok(())
}

/// The producer, as `quarry-producer run --dump FILE --all-versions` runs it.
async fn publish_with_producer(config: &quarry_infra::Config, dump: &Path) -> anyhow::Result<u64> {
    let definition = RunDefinition {
        patch: None,
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: quarry_testkit::experiment(Mode::Check, 600),
        selection: Selection::Dump {
            path: dump.to_owned(),
            sort: Sort::Alpha,
            limit: None,
        },
        filter: quarry_producer::selection::Filter {
            all_versions: true,
            ..Default::default()
        },
        toolchain_files: Vec::new(),
    };
    let summary = publish_run(config, "publish", &definition, &CancellationToken::new()).await?;
    anyhow::ensure!(summary.complete, "the producer stopped early");
    Ok(summary.jobs_queued)
}

/// The same messages, published by lapin alone into a queue of the same kind: a page at a time,
/// waiting for the page's confirms.
async fn publish_bare(
    config: &quarry_infra::Config,
    versions: u32,
    page: usize,
) -> anyhow::Result<u64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let connection = lapin::Connection::connect(
        config.rabbitmq.url.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            "bare-publish".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    let run = quarry_core::job::RunId::default();
    let toolchain = quarry_testkit::toolchain();
    let experiment = quarry_testkit::experiment(Mode::Check, 600);
    let mut published = 0;
    let mut next = 0;
    while next < versions {
        let end = versions.min(next + page as u32);
        let mut confirms = Vec::with_capacity(page);
        for i in next..end {
            let (name, version, checksum) = generated_version(i);
            let job = quarry_core::job::Job::new(
                run,
                quarry_core::job::PackageVersion {
                    name,
                    version,
                    checksum,
                },
                toolchain.clone(),
                experiment.clone(),
            );
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(job.id.to_string().into());
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        "bare-publish".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &job.to_message(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in futures::future::join_all(confirms).await {
            anyhow::ensure!(confirm?.is_ack(), "the broker refused a message");
            published += 1;
        }
        next = end;
    }
    connection.close(0, "done".into()).await?;
    Ok(published)
}

/// This process's peak resident set size, from /proc/self/status.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM line")?
        .parse()?)
}
