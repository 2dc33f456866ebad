//! How far a run has got, kept apart from what its jobs came to: progress, the pace of the
//! fleet, and when the run will end (its ETA counts the work left, not the jobs).

use serde::Serialize;

use crate::job::Outcome;

/// How far a run has got: progress, kept apart from outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Jobs recorded by the producer so far.
    pub recorded: i64,
    /// Jobs with a final result.
    pub finished: i64,
    /// Known only once the producer has published everything.
    pub total: Option<i64>,
}

impl Progress {
    pub fn is_complete(&self) -> bool {
        self.total.is_some_and(|total| self.finished >= total)
    }
}

/// A run as the live view shows it: progress, pace and outcomes so far.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub progress: Progress,
    /// Jobs dead-lettered (each also has an `error` result).
    pub dead_lettered: i64,
    /// Results recorded in the last `window_secs`: the current pace.
    pub recent: i64,
    pub window_secs: i64,
    /// What those results took to run, added up: the work the fleet gets through.
    pub recent_work_ms: i64,
    /// The expected durations of the recorded jobs without a result, added up (`expected_ms`:
    /// from earlier runs), and how many of them have none.
    pub pending_expected_ms: i64,
    pub pending_unknown: i64,
    /// The mean duration of the results computed in this run so far: what a job never run
    /// before is expected to take.
    pub mean_ms: Option<f64>,
    /// Results per toolchain and outcome.
    pub outcomes: Vec<(String, Outcome, i64)>,
}

/// A run's pace and what is left, as the live view and `status` show them.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Results per second over the last five minutes.
    pub per_second: f64,
    /// Jobs without a result (of those recorded so far).
    pub pending: i64,
    /// Seconds until the last result: the work left (the pending jobs' expected durations, from
    /// earlier runs, else this run's mean) at the rate the fleet got through work lately, so
    /// that a few slow crates left count as what they are; `None` when nothing is moving.
    pub eta_secs: Option<f64>,
}

impl Pace {
    pub fn of(figures: &RunFigures) -> Pace {
        let window = figures.window_secs.max(1) as f64;
        let per_second = figures.recent as f64 / window;
        let known = figures.progress.total.unwrap_or(figures.progress.recorded);
        let pending = (known - figures.progress.finished).max(0);
        // Work-seconds done per second: about the slots kept busy.
        let work_per_second = figures.recent_work_ms as f64 / 1000.0 / window;
        // A job never run before is expected to take the run's mean.
        let remaining_secs = (figures.pending_expected_ms as f64
            + figures.pending_unknown as f64 * figures.mean_ms.unwrap_or(0.0))
            / 1000.0;
        let eta_secs = if pending == 0 {
            Some(0.0)
        } else if work_per_second > 0.0 {
            Some(remaining_secs / work_per_second)
        } else {
            None
        };
        Pace {
            per_second,
            pending,
            eta_secs,
        }
    }
}

/// `1h 02m`, `3m 10s`, `42s`.
pub fn human_duration(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_counts_the_work_left_not_the_jobs() {
        let figures = |pending_expected_ms, pending_unknown| RunFigures {
            progress: Progress {
                recorded: 110,
                finished: 100,
                total: Some(110),
            },
            dead_lettered: 0,
            // 100 results of 2 s each in 100 s: two slots kept busy.
            recent: 100,
            window_secs: 100,
            recent_work_ms: 200_000,
            pending_expected_ms,
            pending_unknown,
            mean_ms: Some(2_000.0),
            outcomes: Vec::new(),
        };
        // Ten jobs left, one of them a crate that took 1,000 s last time: 1,018 work-seconds
        // on two slots, not ten jobs at one per second.
        let slow = Pace::of(&figures(1_000_000 + 9 * 2_000, 0));
        assert_eq!(slow.pending, 10);
        assert!((slow.eta_secs.unwrap() - 509.0).abs() < 1e-6, "{slow:?}");
        // Never run before: the run's mean each.
        let unknown = Pace::of(&figures(0, 10));
        assert!(
            (unknown.eta_secs.unwrap() - 10.0).abs() < 1e-6,
            "{unknown:?}"
        );
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_duration(42.4), "42s");
        assert_eq!(human_duration(190.0), "3m 10s");
        assert_eq!(human_duration(3720.0), "1h 02m");
    }
}
