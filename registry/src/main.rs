//! `quarry-registry`: serves a directory of real `.crate` files as a crates.io-compatible registry.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use quarry_registry::{Corpus, serve};

/// A local crates.io-compatible registry (sparse index, downloads, paged /api/v1/crates) over
/// real .crate files, for Quarry's tests and demo. Fault injection: PUT /-/faults with a JSON
/// list of faults; counters: GET /-/stats.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Directories searched (three levels deep) for .crate files.
    #[arg(
        long = "crates-dir",
        value_name = "DIR",
        default_value = "~/.cargo/registry/cache"
    )]
    crates_dirs: Vec<String>,
    /// Serve every crate found, even those whose dependencies cannot all be met by the others
    /// (by default they are left out, so every listed crate can be resolved and built).
    #[arg(long)]
    unresolvable_too: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9015")]
    listen: SocketAddr,
    /// Instead of serving, write the crates.io-format database dump of the crates found to
    /// FILE (a db-dump.tar.gz for `quarry-producer run --dump`) and exit.
    #[arg(long, value_name = "FILE")]
    write_dump: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = quarry_shared::telemetry::init("quarry-registry");
    let cli = Cli::parse();
    let dirs: Vec<PathBuf> = cli.crates_dirs.iter().map(|d| expand_home(d)).collect();
    let mut corpus = Corpus::load(&dirs)?;
    if !cli.unresolvable_too {
        let found = corpus.crates.len();
        corpus = corpus.closed();
        tracing::info!(
            found,
            kept = corpus.crates.len(),
            "kept the crates whose dependencies the registry can serve"
        );
    }
    for (path, reason) in &corpus.skipped {
        tracing::warn!(path = %path.display(), %reason, "skipped a .crate file");
    }
    anyhow::ensure!(
        !corpus.crates.is_empty(),
        "no .crate files found under {dirs:?}"
    );
    let (crates, versions) = (corpus.crates.len(), corpus.versions());
    if let Some(out) = &cli.write_dump {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        quarry_registry::dump::write_corpus_dump(&corpus, out, &now)?;
        eprintln!(
            "wrote the dump of {crates} crates ({versions} versions) to {}",
            out.display()
        );
        return Ok(());
    }
    let registry = serve(corpus, cli.listen).await?;
    tracing::info!(
        crates,
        versions,
        index = %registry.index_url(),
        api = %registry.api_url(),
        "registry serving"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}

fn expand_home(dir: &str) -> PathBuf {
    match (dir.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(dir),
    }
}
