//! The producer's progress on stderr while it pages.

use crate::publishing::PublishSummary;

/// Progress on stderr while paging: a spinner line on a terminal, a log line every ten seconds
/// otherwise.
pub(crate) struct PublishProgress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    last_line: std::time::Instant,
}

impl PublishProgress {
    pub(crate) fn new() -> PublishProgress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(250));
            bar
        });
        let now = std::time::Instant::now();
        PublishProgress {
            bar,
            started: now,
            last_line: now,
        }
    }

    pub(crate) fn page(&mut self, summary: &PublishSummary, expected_pages: Option<u64>) {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = summary.jobs_queued as f64 / elapsed;
        let eta = expected_pages
            .filter(|&total| total > summary.pages)
            .map(|total| {
                let per_page = elapsed / summary.pages.max(1) as f64;
                format!(
                    ", ETA {}",
                    indicatif::HumanDuration(std::time::Duration::from_secs_f64(
                        per_page * (total - summary.pages) as f64
                    ))
                )
            })
            .unwrap_or_default();
        let pages = match expected_pages {
            Some(total) => format!("{}/{total}", summary.pages),
            None => summary.pages.to_string(),
        };
        let line = format!(
            "pages {pages}, {} jobs queued, {rate:.0} jobs/s{eta}",
            summary.jobs_queued
        );
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None if self.last_line.elapsed() >= std::time::Duration::from_secs(10) => {
                self.last_line = std::time::Instant::now();
                tracing::info!("{line}");
            }
            None => tracing::debug!("{line}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
