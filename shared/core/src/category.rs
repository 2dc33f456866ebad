//! The category a package falls into between a run's two toolchains, *start* and *end*: what a
//! person acts on (regressed, fixed, what only looks like it changed). Shared because the
//! reporter reports it and the producer selects by it (`--from-run RUN --only regressed`).

use serde::{Deserialize, Serialize};

use crate::job::Outcome;

/// What happened to a package between the start and the end toolchain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// Passed with start, fails with end (and failed again when end was run once more): the
    /// reason runs are made.
    Regressed,
    /// The end toolchain crashed on the package (an internal compiler error) where start did
    /// not, whatever start's outcome: a failure that turns into an ICE is news. Read from the
    /// logs, so the reporter decides it, not `categorize`.
    RegressedIce,
    /// Passed with start, failed with end, then passed when end was run once more: the package
    /// does not behave the same twice (flaky tests, a race). Kept apart from true regressions.
    Flaky,
    /// Failed with start, passes with end.
    Fixed,
    /// Passed with start, then failed with end for a reason in the environment (a time or
    /// memory limit, the sandbox denying it the network), probably not the code. Kept apart
    /// from true regressions.
    SpuriousRegressed,
    /// Failed for a reason in the environment with start, passes with end.
    SpuriousFixed,
    StillFailing,
    StillPassing,
    /// Could not be unpacked or resolved at all.
    Broken,
    /// Quarry's infrastructure failed for one side: says nothing about the package.
    Error,
    Skipped,
    /// One side has no result yet.
    Pending,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Regressed => "regressed",
            Category::RegressedIce => "regressed-ice",
            Category::Flaky => "flaky",
            Category::Fixed => "fixed",
            Category::SpuriousRegressed => "spurious-regressed",
            Category::SpuriousFixed => "spurious-fixed",
            Category::StillFailing => "still-failing",
            Category::StillPassing => "still-passing",
            Category::Broken => "broken",
            Category::Error => "error",
            Category::Skipped => "skipped",
            Category::Pending => "pending",
        }
    }
}

fn passed(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::BuildPass | Outcome::TestPass)
}

/// One side of a package as the comparison sees it: its outcome, and whether its failure
/// points at the environment rather than the code (its result's `environment`, such as the
/// sandbox denying it the network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub environmental: bool,
}

impl From<Outcome> for Verdict {
    fn from(outcome: Outcome) -> Verdict {
        Verdict {
            outcome,
            environmental: false,
        }
    }
}

impl Verdict {
    /// Failed because of the environment: a time or memory limit, or the network denied.
    fn environmental_failure(self) -> bool {
        matches!(self.outcome, Outcome::Timeout | Outcome::OutOfMemory)
            || (self.environmental && !passed(self.outcome))
    }
}

/// Where a failed job's log shows the sandbox denying it the network (it has none): the line
/// that says so. Such a failure points at the environment, not the package's code.
pub fn network_denial(log: &str) -> Option<&str> {
    const SIGNS: [&str; 5] = [
        "Network is unreachable",
        "os error 101",
        "Temporary failure in name resolution",
        "failed to lookup address information",
        "No address associated with hostname",
    ];
    log.lines()
        .find(|line| SIGNS.iter().any(|sign| line.contains(sign)))
        .map(str::trim)
}

/// Where a failed job's log shows the disk it writes to full: the line that says so. Such a
/// failure points at the machine, not the package's code.
pub fn no_space(log: &str) -> Option<&str> {
    const SIGNS: [&str; 2] = ["No space left on device", "os error 28"];
    log.lines()
        .find(|line| SIGNS.iter().any(|sign| line.contains(sign)))
        .map(str::trim)
}

/// Why a job's failure points at the environment rather than the code, from its outcome and
/// log (`network denied: <the log's line>`, `no space left: <the log's line>`); `None` for
/// passes and ordinary failures. Time and memory limits are outcomes of their own and need no
/// reason; a sandbox that could not start a step is said by the consumer, which knows it.
pub fn environment_of(outcome: Outcome, log: &str) -> Option<String> {
    let short = |line: &str| line.chars().take(300).collect::<String>();
    if !matches!(
        outcome,
        Outcome::BuildFail | Outcome::TestFail | Outcome::Broken
    ) {
        return None;
    }
    if let Some(line) = no_space(log) {
        return Some(format!("no space left: {}", short(line)));
    }
    if outcome == Outcome::Broken {
        return None;
    }
    let line = network_denial(log)?;
    Some(format!("network denied: {}", short(line)))
}

/// The kind of an environmental failure, for counting them apart: `out of memory`, `timeout`,
/// or the reason's words before its colon (`network denied`, `no space left`, `sandbox
/// error`).
pub fn spurious_kind(outcome: Outcome, environment: Option<&str>) -> Option<String> {
    match outcome {
        Outcome::OutOfMemory => Some("out of memory".to_owned()),
        Outcome::Timeout => Some("timeout".to_owned()),
        _ => environment.map(|why| why.split(':').next().unwrap_or(why).trim().to_owned()),
    }
}

/// One side of one package in a run, as the comparison reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideVerdict {
    pub name: String,
    pub version: String,
    /// The side's label (`Job::side`).
    pub side: String,
    pub verdict: Verdict,
}

/// Each package's category in a two-side run, from its sides' verdicts: `start` and `end` are
/// the sides' labels (end's re-run is found by its own).
pub fn package_categories(
    rows: impl IntoIterator<Item = SideVerdict>,
    start: &str,
    end: &str,
) -> std::collections::BTreeMap<(String, String), Category> {
    let end_rerun = crate::job::rerun_label(end);
    let mut sides: std::collections::BTreeMap<(String, String), [Option<Verdict>; 3]> =
        std::collections::BTreeMap::new();
    for SideVerdict {
        name,
        version,
        side,
        verdict,
    } in rows
    {
        let slot = if side == start {
            0
        } else if side == end {
            1
        } else if side == end_rerun {
            2
        } else {
            continue;
        };
        sides.entry((name, version)).or_default()[slot] = Some(verdict);
    }
    sides
        .into_iter()
        .map(|(package, [start, end, rerun])| {
            (package, categorize(start, end, rerun.map(|v| v.outcome)))
        })
        .collect()
}

/// Whether a package whose sides came to `start` and `end` is run once more on its end side, to
/// tell a regression that happens again from a flaky one (as Crater re-runs its regressions).
/// Only a regression as such: not one the end side's environment explains (spurious), not an
/// error, a skip or a broken package, and not while a side has no result.
pub fn rerun_wanted(start: Option<Verdict>, end: Option<Verdict>) -> bool {
    categorize(start, end, None) == Category::Regressed
}

/// The category of a package from its start and end results, and for a regression the outcome
/// of end's re-run (`None` while it has none: the regression is then not yet confirmed, and is
/// counted as one).
pub fn categorize(
    start: Option<Verdict>,
    end: Option<Verdict>,
    end_rerun: Option<Outcome>,
) -> Category {
    let (Some(start_verdict), Some(end_verdict)) = (start, end) else {
        return Category::Pending;
    };
    let (start, end) = (start_verdict.outcome, end_verdict.outcome);
    let either = |outcome: Outcome| start == outcome || end == outcome;
    if either(Outcome::Error) {
        Category::Error
    } else if either(Outcome::Skipped) {
        Category::Skipped
    } else if [start_verdict, end_verdict]
        .iter()
        .any(|v| v.outcome == Outcome::Broken && !v.environmental)
    {
        // Broken by the machine (its disk full while resolving) is a spurious failure below.
        Category::Broken
    } else {
        match (passed(start), passed(end)) {
            (true, true) => Category::StillPassing,
            (true, false) if end_verdict.environmental_failure() => Category::SpuriousRegressed,
            (true, false) if end_rerun.is_some_and(passed) => Category::Flaky,
            (true, false) => Category::Regressed,
            (false, true) if start_verdict.environmental_failure() => Category::SpuriousFixed,
            (false, true) => Category::Fixed,
            (false, false) => Category::StillFailing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_regression_is_run_again() {
        let pass = Some(Verdict::from(Outcome::BuildPass));
        let fail = Some(Verdict::from(Outcome::BuildFail));
        assert!(rerun_wanted(pass, fail));
        assert!(!rerun_wanted(pass, pass));
        assert!(!rerun_wanted(fail, pass));
        assert!(!rerun_wanted(fail, fail));
        assert!(!rerun_wanted(pass, None), "the end side has no result yet");
        assert!(!rerun_wanted(pass, Some(Verdict::from(Outcome::Timeout))));
        let denied = Some(Verdict {
            outcome: Outcome::BuildFail,
            environmental: true,
        });
        assert!(!rerun_wanted(pass, denied), "the sandbox explains it");
        assert!(!rerun_wanted(pass, Some(Verdict::from(Outcome::Error))));
    }
}
