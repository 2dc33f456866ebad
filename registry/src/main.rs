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
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Serve a corpus collected by `quarry-registry corpus` (its `crates/`), whole: every root
    /// of it resolves by construction. Replaces --crates-dir.
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9015")]
    listen: SocketAddr,
    /// Instead of serving, write the crates.io-format database dump of the crates found to
    /// FILE (a db-dump.tar.gz for `quarry-producer run --dump`) and exit.
    #[arg(long, value_name = "FILE")]
    write_dump: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Collects real crates with their whole dependency trees through cargo: for each
    /// `name@version` of the list, the crate and everything it needs as a workspace root
    /// (normal, build, dev and optional dependencies, every target platform). Roots already
    /// complete are skipped; those that cannot be collected are reported with the reason.
    Corpus {
        /// The roots: one `name@version` per line, `#` comments.
        #[arg(long, value_name = "FILE")]
        list: PathBuf,
        /// The corpus directory (created if missing).
        #[arg(long, value_name = "DIR")]
        into: PathBuf,
        /// The cargo that downloads.
        #[arg(long, default_value = "cargo")]
        cargo: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs only: the test registry depends on the domain alone, not on Quarry's telemetry.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Corpus { list, into, cargo }) = &cli.command {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("cannot read {}", list.display()))?;
        let roots = quarry_registry::collect::read_list(&text)
            .with_context(|| format!("in {}", list.display()))?;
        let (list, into, cargo) = (list.clone(), into.clone(), cargo.clone());
        let manifest = tokio::task::spawn_blocking(move || {
            quarry_registry::collect::collect(&roots, &into, &cargo)
        })
        .await??;
        for failed in manifest.roots.iter().filter(|r| r.status != "complete") {
            eprintln!(
                "not collected: {}@{}: {}",
                failed.name,
                failed.version,
                failed.reason.as_deref().unwrap_or("?")
            );
        }
        anyhow::ensure!(
            manifest.complete > 0,
            "no root of {} could be collected",
            list.display()
        );
        return Ok(());
    }
    let (dirs, whole) = match &cli.corpus {
        Some(corpus) => (vec![corpus.join("crates")], true),
        None => (
            cli.crates_dirs.iter().map(|d| expand_home(d)).collect(),
            cli.unresolvable_too,
        ),
    };
    let mut corpus = Corpus::load(&dirs)?;
    if !whole {
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
