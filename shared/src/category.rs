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
    /// Passed with start, failed with end, then passed when end was run once more: the package
    /// does not behave the same twice (flaky tests, a race). Kept apart from true regressions.
    Flaky,
    /// Failed with start, passes with end.
    Fixed,
    /// Passed with start, then hit a limit (time, memory) with end: the environment, probably
    /// not the code. Kept apart from true regressions.
    SpuriousRegressed,
    /// Hit a limit with start, passes with end.
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

fn hit_a_limit(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Timeout | Outcome::OutOfMemory)
}

/// The category of a package from its start and end outcomes, and for a regression the outcome
/// of end's re-run (`None` while it has none: the regression is then not yet confirmed, and is
/// counted as one).
pub fn categorize(
    start: Option<Outcome>,
    end: Option<Outcome>,
    end_rerun: Option<Outcome>,
) -> Category {
    let (Some(start), Some(end)) = (start, end) else {
        return Category::Pending;
    };
    let either = |outcome: Outcome| start == outcome || end == outcome;
    if either(Outcome::Error) {
        Category::Error
    } else if either(Outcome::Skipped) {
        Category::Skipped
    } else if either(Outcome::Broken) {
        Category::Broken
    } else {
        match (passed(start), passed(end)) {
            (true, true) => Category::StillPassing,
            (true, false) if hit_a_limit(end) => Category::SpuriousRegressed,
            (true, false) if end_rerun.is_some_and(passed) => Category::Flaky,
            (true, false) => Category::Regressed,
            (false, true) if hit_a_limit(start) => Category::SpuriousFixed,
            (false, true) => Category::Fixed,
            (false, false) => Category::StillFailing,
        }
    }
}
