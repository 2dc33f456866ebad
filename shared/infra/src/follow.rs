//! Following a run from the database in a terminal, for `quarry-reporter status` and
//! `quarry-producer run --wait`: progress, pace and ETA as the run goes, a summary at the end.

use std::fmt::Write as _;

use quarry_core::progress::{Pace, human_duration};

use crate::Config;
use crate::store::Store;

/// Follows a run in the terminal until every job has a result (or `stop` is cancelled): a
/// progress bar with done / total, pace and ETA where stderr is a terminal, a line every 30 s
/// where it is not. Returns the summary to print at the end.
pub async fn follow(
    config: &Config,
    run: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<String> {
    use std::io::IsTerminal as _;
    let store = Store::connect(&config.database).await?;
    let run = store.find_run(run).await?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(run.name.clone());
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    let figures = loop {
        let figures = store
            .run_figures(run.id, std::time::Duration::from_secs(300))
            .await?;
        let pace = Pace::of(&figures);
        let progress = figures.progress;
        let eta = pace.eta_secs.map_or("–".to_owned(), human_duration);
        let message = format!(
            "{:.1}/min, ETA {eta}, {} dead-lettered",
            pace.per_second * 60.0,
            figures.dead_lettered
        );
        bar.set_length(progress.total.unwrap_or(progress.recorded) as u64);
        bar.set_position(progress.finished as u64);
        bar.set_message(message.clone());
        if !terminal && last_line.elapsed() >= std::time::Duration::from_secs(30) {
            eprintln!(
                "{}: {} of {} jobs, {message}",
                run.name,
                progress.finished,
                progress
                    .total
                    .map_or_else(|| format!("{}+", progress.recorded), |t| t.to_string())
            );
            last_line = std::time::Instant::now();
        }
        if progress.is_complete() || stop.is_cancelled() {
            break figures;
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            () = stop.cancelled() => {}
        }
    };
    bar.finish_and_clear();
    let progress = figures.progress;
    let mut summary = format!(
        "run {}: {} of {} jobs finished{}\n",
        run.name,
        progress.finished,
        progress
            .total
            .map_or_else(|| format!("{}+", progress.recorded), |t| t.to_string()),
        if progress.is_complete() {
            ""
        } else {
            " (still running)"
        }
    );
    for (toolchain, outcome, count) in &figures.outcomes {
        let _ = writeln!(summary, "  {toolchain:<12} {outcome:<14} {count}");
    }
    if figures.dead_lettered > 0 {
        let _ = writeln!(summary, "  {} dead-lettered", figures.dead_lettered);
    }
    let _ = writeln!(
        summary,
        "report: quarry-reporter generate {}   live: quarry-reporter serve",
        run.name
    );
    Ok(summary)
}
