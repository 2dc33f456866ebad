//! Comparing a package's outcomes under the run's two toolchains, *start* and *end*, into the
//! category a person acts on: what regressed, what was fixed, what only looks like it changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use quarry_core::category::{Category, Verdict, categorize};

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
    /// For a package that failed on end only: the outcome of end's re-run, which decides
    /// between regressed and flaky.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_rerun: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_rerun_log: Option<String>,
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

/// One side of a package: its result and log path under one toolchain.
pub struct Side<'a> {
    pub verdict: Verdict,
    pub log: Option<&'a str>,
    /// Its log shows an internal compiler error.
    pub ice: bool,
}

/// A package's sides: start, end, and end's re-run (`None` where there is no result).
#[derive(Default)]
pub struct Sides<'a> {
    pub start: Option<Side<'a>>,
    pub end: Option<Side<'a>>,
    pub end_rerun: Option<Side<'a>>,
}

/// Builds the comparison from every package's sides.
pub fn compare<'a>(
    start: &str,
    end: &str,
    packages: impl IntoIterator<Item = ((String, String), Sides<'a>)>,
) -> Comparison {
    let mut categories = BTreeMap::new();
    let mut rows = Vec::new();
    for ((name, version), sides) in packages {
        let Sides {
            start: start_side,
            end: end_side,
            end_rerun,
        } = sides;
        let category = categorize(
            start_side.as_ref().map(|s| s.verdict),
            end_side.as_ref().map(|s| s.verdict),
            end_rerun.as_ref().map(|s| s.verdict.outcome),
        );
        // The end toolchain crashing where start did not is a regression whatever start did.
        let ice = |side: &Option<Side<'_>>| side.as_ref().is_some_and(|s| s.ice);
        let category = if ice(&end_side) && start_side.is_some() && !ice(&start_side) {
            Category::RegressedIce
        } else {
            category
        };
        *categories.entry(category.as_str().to_owned()).or_insert(0) += 1;
        rows.push(ComparedPackage {
            name,
            version,
            category: category.as_str().to_owned(),
            start: start_side.as_ref().map(|s| s.verdict.outcome.to_string()),
            end: end_side.as_ref().map(|s| s.verdict.outcome.to_string()),
            start_log: start_side.and_then(|s| s.log.map(str::to_owned)),
            end_log: end_side.and_then(|s| s.log.map(str::to_owned)),
            end_rerun: end_rerun.as_ref().map(|s| s.verdict.outcome.to_string()),
            end_rerun_log: end_rerun.and_then(|s| s.log.map(str::to_owned)),
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
    use quarry_core::job::Outcome::{self, *};

    /// The category of plain outcomes (nothing environmental), with end's re-run if any.
    fn of(start: Outcome, end: Option<Outcome>, rerun: Option<Outcome>) -> Category {
        categorize(Some(start.into()), end.map(Verdict::from), rerun)
    }

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
            assert_eq!(of(start, Some(end), None), expected, "{start} → {end}");
        }
        assert_eq!(of(TestPass, None, None), Category::Pending);
        // A regression is confirmed by its re-run failing again, and dismissed as flaky by
        // its re-run passing; a re-run says nothing about other categories.
        assert_eq!(
            of(TestPass, Some(TestFail), Some(TestFail)),
            Category::Regressed
        );
        assert_eq!(
            of(TestPass, Some(TestFail), Some(TestPass)),
            Category::Flaky
        );
        assert_eq!(
            of(BuildFail, Some(BuildPass), Some(BuildFail)),
            Category::Fixed
        );
    }

    #[test]
    fn an_internal_compiler_error_on_the_end_side_is_a_regression_whatever_start_did() {
        let side = |outcome: Outcome, ice: bool| Side {
            verdict: outcome.into(),
            log: None,
            ice,
        };
        let category = |start: Side<'static>, end: Side<'static>| {
            let sides = Sides {
                start: Some(start),
                end: Some(end),
                end_rerun: None,
            };
            compare(
                "1.95.0",
                "nightly",
                [(("p".to_owned(), "1.0.0".to_owned()), sides)],
            )
            .packages[0]
                .category
                .clone()
        };
        // A build failure turned into a crash is news; a pass turned into one too.
        assert_eq!(
            category(side(BuildFail, false), side(BuildFail, true)),
            "regressed-ice"
        );
        assert_eq!(
            category(side(BuildPass, false), side(BuildFail, true)),
            "regressed-ice"
        );
        // A crash on both sides is not new; an ordinary failure stays what it was.
        assert_eq!(
            category(side(BuildFail, true), side(BuildFail, true)),
            "still-failing"
        );
        assert_eq!(
            category(side(BuildFail, false), side(BuildFail, false)),
            "still-failing"
        );
    }

    #[test]
    fn a_failure_for_want_of_network_is_spurious_not_a_regression() {
        let denied = Verdict {
            outcome: TestFail,
            environmental: true,
        };
        assert_eq!(
            categorize(Some(TestPass.into()), Some(denied), None),
            Category::SpuriousRegressed
        );
        assert_eq!(
            categorize(Some(denied), Some(TestPass.into()), None),
            Category::SpuriousFixed
        );
        assert_eq!(
            categorize(Some(denied), Some(denied), None),
            Category::StillFailing
        );
        let log = "running 1 test\nthread 'fetches' panicked at src/lib.rs:4:\n\
                   called `Result::unwrap()` on an `Err` value: Os { code: 101, kind: \
                   NetworkUnreachable, message: \"Network is unreachable\" }\n";
        let why = quarry_core::category::environment_of(TestFail, log).unwrap();
        assert!(
            why.starts_with("network denied: called `Result::unwrap()`"),
            "{why}"
        );
        assert_eq!(quarry_core::category::environment_of(TestPass, log), None);
        assert_eq!(
            quarry_core::category::environment_of(TestFail, "assertion failed: 1 == 2"),
            None
        );
    }

    #[test]
    fn a_full_disk_is_spurious_even_where_it_broke_resolution() {
        use quarry_core::category::{environment_of, spurious_kind};
        let log = "error: failed to unpack package `syn v2.0.1`\n\nCaused by:\n  failed to write \
                   /j/cargo-home/registry/src/x/syn-2.0.1/src/lib.rs: No space left on device \
                   (os error 28)\n";
        let why = environment_of(Broken, log).unwrap();
        assert!(why.starts_with("no space left: "), "{why}");
        assert_eq!(
            spurious_kind(Broken, Some(&why)).as_deref(),
            Some("no space left")
        );
        let full = Verdict {
            outcome: Broken,
            environmental: true,
        };
        assert_eq!(
            categorize(Some(BuildPass.into()), Some(full), None),
            Category::SpuriousRegressed
        );
        // Broken for the package's own reasons stays broken, and nothing else is spurious.
        assert_eq!(
            categorize(Some(BuildPass.into()), Some(Broken.into()), None),
            Category::Broken
        );
        assert_eq!(
            environment_of(Broken, "error: no matching package named `x`"),
            None
        );
        assert_eq!(spurious_kind(Timeout, None).as_deref(), Some("timeout"));
        assert_eq!(
            spurious_kind(TestFail, Some("sandbox error: bwrap: Can't mount proc")).as_deref(),
            Some("sandbox error")
        );
        assert_eq!(spurious_kind(TestFail, None), None);
    }
}
