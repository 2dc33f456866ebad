//! `quarry-consumer`: one worker of the fleet. A thin command line over the `quarry_consumer`
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quarry_infra::Config;
use quarry_infra::config::ConfigArgs;

/// Takes Quarry jobs from RabbitMQ, fetches each package through its cache layers (local disk,
/// S3, then the registry), runs the experiment in a bubblewrap sandbox and records its outcome in
/// PostgreSQL before acknowledging the job. Runs until
/// SIGINT or SIGTERM, then finishes (or gives back) the jobs in hand and exits 0.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Name in logs and the event log [default: <hostname>-<pid>].
    #[arg(long, env = "QUARRY_CONSUMER_NAME")]
    name: Option<String>,
    /// Experiments run at once by this process (it holds twice as many jobs, fetching and
    /// recording the others meanwhile).
    #[arg(long, env = "QUARRY_CONSUMER_CONCURRENCY")]
    concurrency: Option<u16>,
    /// Directory for the cargo home and job scratch space.
    #[arg(long, env = "QUARRY_CONSUMER_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "QUARRY_CONSUMER_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Run packages' code without the bubblewrap sandbox (no isolation at all: only where
    /// bubblewrap cannot run and the machine holds nothing of value).
    #[arg(long, env = "QUARRY_CONSUMER_UNSANDBOXED")]
    unsandboxed: bool,
    // Last, so that its help heading covers only the configuration flags.
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    quarry_infra::telemetry::main("quarry-consumer", || async {
        run(Cli::parse()).await.map(|()| ExitCode::SUCCESS)
    })
    .await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(&cli.config)?;
    if let Some(name) = cli.name {
        config.consumer.name = Some(name);
    }
    if let Some(concurrency) = cli.concurrency {
        config.consumer.concurrency = concurrency;
    }
    if let Some(work_dir) = cli.work_dir {
        config.consumer.work_dir = work_dir;
    }
    if let Some(addr) = cli.metrics_listen {
        config.consumer.metrics_listen = Some(addr);
    }
    if cli.unsandboxed {
        config.consumer.unsandboxed = true;
    }
    let shutdown = quarry_infra::shutdown::on_signal()?;
    quarry_consumer::run(&config, shutdown).await?;
    Ok(())
}
