//! `quarry-reporter`: writes reports of runs. A thin command line over the `quarry_reporter`
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use quarry_infra::Config;
use quarry_infra::config::ConfigArgs;

/// Turns the results of a Quarry run, stored in PostgreSQL, into a report: an HTML page to open
/// offline, a JSON file for machines, a markdown summary to paste into an issue, and every log.
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
    /// Why a package is where it is in a run: every event of its jobs (queued, started,
    /// attempts failed and why, dead-lettered, finished) and what it is waiting for.
    Explain {
        /// The run's id or name.
        run: String,
        /// The package, as `name` or `name@version`.
        package: String,
    },
    /// Check a run's invariants: every job published and with exactly one result, dead letters
    /// with an error result, the written report counting what the database counts. Exits 1 and
    /// lists the problems if any invariant is broken.
    Verify {
        /// The run's id or name.
        run: String,
        /// Directory holding reports [default: the configured reporter.output_dir, `reports`].
        #[arg(long, env = "QUARRY_REPORT_DIR")]
        output: Option<PathBuf>,
    },
    /// Follow a run in the terminal: a progress bar with done / total, rate and ETA until
    /// every job has a result (or Ctrl-C), then the summary.
    Status {
        /// The run's id or name.
        run: String,
    },
    /// Serve the live view of every run (progress, pace, ETA, failures so far, dead letters,
    /// the consumers), the written reports, /compare/RUN_A/RUN_B and Prometheus /metrics.
    /// Cancelling a run (POST /runs/RUN/cancel) needs the bearer token.
    Serve {
        /// Address to listen on [default: the configured reporter.listen, 127.0.0.1:8080].
        #[arg(long, env = "QUARRY_REPORTER_LISTEN")]
        listen: Option<String>,
        /// Directory holding reports [default: the configured reporter.output_dir, `reports`].
        #[arg(long, env = "QUARRY_REPORT_DIR")]
        output: Option<PathBuf>,
    },
    /// Write the report of a run (by id or name) into OUTPUT/<run name>/.
    Generate {
        /// The run's id or name.
        run: String,
        /// Directory holding reports [default: the configured reporter.output_dir, `reports`].
        #[arg(long, env = "QUARRY_REPORT_DIR")]
        output: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    quarry_infra::telemetry::main("quarry-reporter", || run(Cli::parse())).await
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&cli.config)?;
    // The environment stands in for the file's `token`; a token_file, when given, wins.
    if let (Ok(token), None) = (
        std::env::var("QUARRY_REPORTER_TOKEN"),
        &config.reporter.token_file,
    ) {
        config.reporter.token = Some(quarry_infra::config::Secret::new(token));
    }
    match cli.command {
        Command::Status { run } => {
            let stop = quarry_infra::shutdown::on_signal()?;
            eprint!(
                "{}",
                quarry_infra::follow::follow(&config, &run, &stop).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { listen, output } => {
            if let Some(listen) = listen {
                config.reporter.listen = listen;
            }
            if let Some(output) = output {
                config.reporter.output_dir = output;
            }
            let shutdown = quarry_infra::shutdown::on_signal()?;
            let (addr, server) = quarry_reporter::serve(&config, shutdown).await?;
            eprintln!("serving the live view at http://{addr}/ (metrics at /metrics)");
            server.await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { run, package } => {
            print!(
                "{}",
                quarry_reporter::explain(&config, &run, &package).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { run, output } => {
            let output = output.unwrap_or_else(|| config.reporter.output_dir.clone());
            let verification = quarry_reporter::verify(&config, &run, &output).await?;
            if verification.is_ok() {
                eprintln!(
                    "run {}: all {} jobs accounted for, {} results, report consistent",
                    verification.run, verification.jobs, verification.results
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "run {}: {} problem(s)",
                    verification.run,
                    verification.problems.len()
                );
                for problem in &verification.problems {
                    eprintln!("  - {problem}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Generate { run, output } => {
            let output = output.unwrap_or_else(|| config.reporter.output_dir.clone());
            let written = quarry_reporter::generate(&config, &run, &output).await?;
            let counts: Vec<String> = written
                .report
                .counts
                .iter()
                .map(|(outcome, n)| format!("{n} {outcome}"))
                .collect();
            eprintln!(
                "run {}: {}",
                written.report.run.name,
                if counts.is_empty() {
                    "no results yet".to_owned()
                } else {
                    counts.join(", ")
                }
            );
            eprintln!("summary: {}", written.markdown.display());
            eprintln!("json:    {}", written.json.display());
            eprintln!("csv:     {}", written.csv.display());
            // The report's path alone on stdout, for scripts.
            println!("{}", written.html.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
