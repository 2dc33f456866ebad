//! Comparing a package's outcomes under the run's two toolchains, *start* and *end*, into the
//! category a person acts on: what regressed, what was fixed, what only looks like it changed.

use std::collections::BTreeMap;

use quarry_shared::job::Outcome;
use serde::{Deserialize, Serialize};

/// What happened to a package between the start and the end toolchain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// Passed with start, fails with end: the reason runs are made.
    Regressed,
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

/// The category of a package from its start and end outcomes.
pub fn categorize(start: Option<Outcome>, end: Option<Outcome>) -> Category {
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
            (true, false) => Category::Regressed,
            (false, true) if hit_a_limit(start) => Category::SpuriousFixed,
            (false, true) => Category::Fixed,
            (false, false) => Category::StillFailing,
        }
    }
}

/// One package's row of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparedPackage {
    pub name: String,
    pub version: String,
    pub category: String,
    pub start: Option<String>,
    pub end: Option<String>,
    pub start_log: Option<String>,
    pub end_log: Option<String>,
}

/// The comparison section of a two-toolchain report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub start: String,
    pub end: String,
    /// Packages per category.
    pub categories: BTreeMap<String, i64>,
    pub packages: Vec<ComparedPackage>,
}

/// One side of a package: its outcome and log path under one toolchain.
pub struct Side<'a> {
    pub outcome: Outcome,
    pub log: &'a str,
}

/// Builds the comparison from every package's two sides (`None` when a side has no result).
pub fn compare<'a>(
    start: &str,
    end: &str,
    packages: impl IntoIterator<Item = ((String, String), Option<Side<'a>>, Option<Side<'a>>)>,
) -> Comparison {
    let mut categories = BTreeMap::new();
    let mut rows = Vec::new();
    for ((name, version), start_side, end_side) in packages {
        let category = categorize(
            start_side.as_ref().map(|s| s.outcome),
            end_side.as_ref().map(|s| s.outcome),
        );
        *categories.entry(category.as_str().to_owned()).or_insert(0) += 1;
        rows.push(ComparedPackage {
            name,
            version,
            category: category.as_str().to_owned(),
            start: start_side.as_ref().map(|s| s.outcome.to_string()),
            end: end_side.as_ref().map(|s| s.outcome.to_string()),
            start_log: start_side.map(|s| s.log.to_owned()),
            end_log: end_side.map(|s| s.log.to_owned()),
        });
    }
    Comparison {
        start: start.to_owned(),
        end: end.to_owned(),
        categories,
        packages: rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn categories_follow_what_changed() {
        let cases = [
            (BuildPass, BuildFail, Category::Regressed),
            (TestPass, TestFail, Category::Regressed),
            (BuildFail, BuildPass, Category::Fixed),
            (TestPass, Timeout, Category::SpuriousRegressed),
            (OutOfMemory, TestPass, Category::SpuriousFixed),
            (BuildFail, TestFail, Category::StillFailing),
            (Timeout, Timeout, Category::StillFailing),
            (TestPass, TestPass, Category::StillPassing),
            (Broken, TestPass, Category::Broken),
            (TestPass, Error, Category::Error),
            (Skipped, BuildFail, Category::Skipped),
        ];
        for (start, end, expected) in cases {
            assert_eq!(
                categorize(Some(start), Some(end)),
                expected,
                "{start} → {end}"
            );
        }
        assert_eq!(categorize(Some(TestPass), None), Category::Pending);
    }
}
