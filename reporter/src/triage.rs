//! What a triager reads first: a two-side run's regressions grouped by root cause. A regressed
//! crate whose end-side failure names another regressed crate of the run as the dependency that
//! did not compile is put under that crate, so one broken library and the hundred crates it
//! broke read as one entry; the roots are grouped by their signature (`E0308: mismatched
//! types`, an internal compiler error, a dependency that is not itself tested), the group that
//! broke most crates first, and in each group the crates most depended on first. Also: the
//! commands that re-run the regressed or the spurious crates, and the diff of a regression's two
//! logs around its first error.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::cause::DEPENDENCY;
use quarry_infra::store::HistoryRow;

use crate::{ComparedPackage, PackageRow};

/// Regressed crates that share a root cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegressionGroup {
    /// The signature of the roots' failure (`E0308: mismatched types`, `internal compiler
    /// error`), or `dependency NAME` for a dependency that is not a regression of this run.
    pub cause: String,
    /// Every crate of the group: its roots and the dependents under them.
    pub crates: usize,
    /// The regressed crates that failed for this cause themselves, the most depended on first.
    pub roots: Vec<Regression>,
}

/// A regressed crate at the root of a failure, with the regressed crates it broke.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Regression {
    pub name: String,
    pub version: String,
    /// `regressed` or `regressed-ice`.
    pub category: String,
    /// Its outcomes on the start and end sides.
    pub start: Option<String>,
    pub end: Option<String>,
    /// How many of the run's packages depend on it directly (from the index).
    pub dependents: i64,
    /// The first error of its end-side log, as printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_log: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_log: Option<String>,
    /// The outcome of the end side's re-run, which confirmed the regression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_rerun: Option<String>,
    /// Its page (the logs' diff around the first error, its history), relative to the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// The regressed crates whose end-side log says they failed because this one did not
    /// compile (directly or through another of them), the most depended on first (their own
    /// `broken` is empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broken: Vec<Regression>,
    /// Its results in the most recent earlier runs that tested it, newest first: was it
    /// already broken last week?
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Earlier>,
}

/// A package's result in an earlier run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Earlier {
    pub run: String,
    pub created_at: String,
    pub version: String,
    pub side: String,
    pub outcome: String,
}

/// Groups the comparison's regressions. `packages` are the report's rows (for each crate's
/// end-side cause and first error), `dependents` the run's dependent counts by lowercase name.
pub fn group(
    compared: &[ComparedPackage],
    packages: &[PackageRow],
    end: &str,
    dependents: &HashMap<String, i64>,
) -> Vec<RegressionGroup> {
    let regressions: Vec<&ComparedPackage> = compared
        .iter()
        .filter(|p| is_regression(&p.category))
        .collect();
    // Only the regressions' end rows are looked up: a million rows need no map of their own.
    let wanted: std::collections::HashSet<(&str, &str)> = regressions
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let end_rows: HashMap<(&str, &str), &PackageRow> = packages
        .iter()
        .filter(|p| p.side == end && wanted.contains(&(p.name.as_str(), p.version.as_str())))
        .map(|p| ((p.name.as_str(), p.version.as_str()), p))
        .collect();
    let regressed: Vec<(&ComparedPackage, Option<&PackageRow>)> = regressions
        .into_iter()
        .map(|p| {
            (
                p,
                end_rows
                    .get(&(p.name.as_str(), p.version.as_str()))
                    .copied(),
            )
        })
        .collect();
    // The regressed crate of each name (the first version, for a run of every version).
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, (p, _)) in regressed.iter().enumerate() {
        by_name.entry(crate_key(&p.name)).or_insert(i);
    }
    let broke_it = |i: usize| -> Option<usize> {
        let cause = regressed[i].1?.cause.as_deref()?;
        let dependency = cause.strip_prefix(DEPENDENCY)?;
        by_name
            .get(&crate_key(dependency))
            .copied()
            .filter(|&d| d != i)
    };
    // Each regression's root: itself, or the regressed crate that broke it, followed to the end;
    // where blame goes round in a circle, the first of the circle.
    let root_of = |i: usize| -> usize {
        let mut chain = vec![i];
        let mut at = i;
        while let Some(next) = broke_it(at) {
            if let Some(pos) = chain.iter().position(|&seen| seen == next) {
                return chain[pos..].iter().copied().min().unwrap_or(next);
            }
            chain.push(next);
            at = next;
        }
        at
    };
    let count = |name: &str| {
        dependents
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    };
    let mut roots: HashMap<usize, Regression> = HashMap::new();
    let mut broken: HashMap<usize, Vec<Regression>> = HashMap::new();
    for (i, &(p, row)) in regressed.iter().enumerate() {
        let regression = Regression {
            name: p.name.clone(),
            version: p.version.clone(),
            category: p.category.clone(),
            start: p.start.clone(),
            end: p.end.clone(),
            dependents: count(&p.name),
            first_error: row.and_then(|r| r.first_error.clone()),
            start_log: p.start_log.clone(),
            end_log: p.end_log.clone(),
            end_rerun: p.end_rerun.clone(),
            page: None,
            broken: Vec::new(),
            history: Vec::new(),
        };
        match root_of(i) {
            root if root == i => {
                roots.insert(i, regression);
            }
            root => broken.entry(root).or_default().push(regression),
        }
    }
    let mut groups: HashMap<String, Vec<Regression>> = HashMap::new();
    for (i, mut root) in roots {
        let row = regressed[i].1;
        let cause = if root.category == "regressed-ice" {
            crate::cause::ICE.to_owned()
        } else {
            row.and_then(|r| r.cause.clone()).unwrap_or_else(|| {
                format!(
                    "{} with no error recognized",
                    regressed[i].0.end.as_deref().unwrap_or("failed")
                )
            })
        };
        let mut under = broken.remove(&i).unwrap_or_default();
        under.sort_by(|a, b| {
            b.dependents
                .cmp(&a.dependents)
                .then_with(|| a.name.cmp(&b.name))
        });
        root.broken = under;
        groups.entry(cause).or_default().push(root);
    }
    let mut groups: Vec<RegressionGroup> = groups
        .into_iter()
        .map(|(cause, mut roots)| {
            roots.sort_by(|a, b| {
                b.dependents
                    .cmp(&a.dependents)
                    .then_with(|| b.broken.len().cmp(&a.broken.len()))
                    .then_with(|| a.name.cmp(&b.name))
                    .then_with(|| a.version.cmp(&b.version))
            });
            RegressionGroup {
                crates: roots.iter().map(|r| 1 + r.broken.len()).sum(),
                cause,
                roots,
            }
        })
        .collect();
    let most_depended = |g: &RegressionGroup| g.roots.first().map_or(0, |r| r.dependents);
    groups.sort_by(|a, b| {
        b.crates
            .cmp(&a.crates)
            .then_with(|| most_depended(b).cmp(&most_depended(a)))
            .then_with(|| a.cause.cmp(&b.cause))
    });
    groups
}

/// The most regressions that get a page of their own (the diff of their logs, their history).
pub const PAGES: usize = 2000;

/// Names the page of each regression, each root before the crates it broke, up to [`PAGES`].
pub fn assign_pages(groups: &mut [RegressionGroup]) {
    let mut n = 0;
    for root in groups.iter_mut().flat_map(|g| g.roots.iter_mut()) {
        let Regression { page, broken, .. } = root;
        for page in std::iter::once(page).chain(broken.iter_mut().map(|d| &mut d.page)) {
            if n < PAGES {
                n += 1;
                *page = Some(format!("regressed/{n}.html"));
            }
        }
    }
}

/// Gives each regression its earlier results (`history` is ordered by package, newest first).
pub fn attach_history(groups: &mut [RegressionGroup], history: Vec<HistoryRow>) {
    let mut by_name: HashMap<String, Vec<Earlier>> = HashMap::new();
    for row in history {
        by_name.entry(row.crate_name).or_default().push(Earlier {
            run: row.run,
            created_at: row.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
            version: row.crate_version,
            side: row.side,
            outcome: row.outcome.to_string(),
        });
    }
    for root in groups.iter_mut().flat_map(|g| g.roots.iter_mut()) {
        let Regression {
            name,
            history,
            broken,
            ..
        } = root;
        for (name, history) in std::iter::once((&*name, history))
            .chain(broken.iter_mut().map(|d| (&d.name, &mut d.history)))
        {
            if let Some(earlier) = by_name.get(name) {
                *history = earlier.clone();
            }
        }
    }
}

/// The re-run commands of the kinds of packages the comparison has (see [`rerun_command`]).
pub fn reruns(
    run: &str,
    definition: &serde_json::Value,
    categories: &BTreeMap<String, i64>,
) -> BTreeMap<String, String> {
    let has = |wanted: &[&str]| wanted.iter().any(|k| categories.contains_key(*k));
    [
        ("regressed", has(&["regressed", "regressed-ice"])),
        (
            "spurious",
            has(&["spurious-regressed", "spurious-fixed", "flaky"]),
        ),
    ]
    .into_iter()
    .filter(|(_, has)| *has)
    .filter_map(|(only, _)| {
        rerun_command(run, definition, only).map(|command| (only.to_owned(), command))
    })
    .collect()
}

fn is_regression(category: &str) -> bool {
    matches!(category, "regressed" | "regressed-ice")
}

/// A crate name as cargo's messages may spell it (dashes or underscores, any case).
fn crate_key(name: &str) -> String {
    name.replace('-', "_").to_ascii_lowercase()
}

/// The command that starts a run of the packages of `run` in `only` (`regressed`,
/// `spurious`), with the same sides and experiment, and `--fresh` so that the results are
/// computed again rather than taken from this run. `None` for a definition it cannot repeat.
pub fn rerun_command(run: &str, definition: &serde_json::Value, only: &str) -> Option<String> {
    let stored = quarry_core::job::StoredDefinition::of(definition).ok()?;
    let mut args = vec![
        "quarry-producer".to_owned(),
        "run".to_owned(),
        "--name".to_owned(),
        format!("{run}-{only}"),
        "--from-run".to_owned(),
        run.to_owned(),
        "--only".to_owned(),
        only.to_owned(),
    ];
    let files: HashMap<&str, &str> = stored
        .toolchain_files
        .iter()
        .map(|f| (f.name.as_str(), f.name.as_str()))
        .collect();
    for toolchain in &stored.toolchains {
        let name = toolchain.to_string();
        if files.contains_key(name.as_str()) {
            // The file is the run creator's; the report cannot know where it is now.
            args.push("--toolchain-file".to_owned());
            args.push(format!("{name}=FILE"));
        } else {
            args.push("--toolchain".to_owned());
            args.push(name);
        }
    }
    if let Some(patch) = &stored.patch {
        args.push("--patch".to_owned());
        args.push(match &patch.source {
            quarry_core::job::PatchSource::Registry => {
                format!("{}={}", patch.name, patch.version)
            }
            quarry_core::job::PatchSource::Upload { .. } => format!("{}=FILE.crate", patch.name),
        });
    }
    let experiment = &stored.experiment;
    args.push("--mode".to_owned());
    args.push(experiment.mode.as_str().to_owned());
    args.push("--timeout".to_owned());
    args.push(experiment.timeout_secs.to_string());
    args.push("--memory-limit".to_owned());
    args.push(experiment.memory_limit_mb.to_string());
    if let Some(cap) = experiment.cap_lints {
        args.push("--cap-lints".to_owned());
        args.push(cap.as_str().to_owned());
    }
    args.push("--fresh".to_owned());
    if let Some(command) = &experiment.command {
        args.push("--".to_owned());
        args.extend(command.iter().cloned());
    }
    Some(
        args.iter()
            .map(|a| shell_word(a))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `word` as a POSIX shell reads it back: as it is when that is safe, else single-quoted.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=+.,/:@%".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Lines of context around a change in [`log_diff`].
const DIFF_CONTEXT: usize = 3;
/// The most lines [`log_diff`] shows.
const DIFF_LINES: usize = 120;

/// One line of a diff: ' ' unchanged, '-' only in start's log, '+' only in end's.
pub type DiffLine = (char, String);

/// The changes between a regression's start and end logs, around the end log's first error (or
/// the first changes, if that line is not among them); at most [`DIFF_LINES`] lines. Lines are
/// compared with what always differs between two jobs taken out (the toolchain in `cargo +X`,
/// the job's scratch directory, timings), and shown as they are.
pub fn log_diff(start: &str, end: &str, first_error: Option<&str>) -> Vec<DiffLine> {
    use similar::{Algorithm, DiffOp, capture_diff_slices_deadline, group_diff_ops};
    let old: Vec<&str> = start.lines().collect();
    let new: Vec<&str> = end.lines().collect();
    let old_key: Vec<String> = old.iter().map(|l| comparable(l)).collect();
    let new_key: Vec<String> = new.iter().map(|l| comparable(l)).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let ops = capture_diff_slices_deadline(Algorithm::Myers, &old_key, &new_key, Some(deadline));
    let groups = group_diff_ops(ops, DIFF_CONTEXT);
    let first_line = first_error.and_then(|e| e.lines().next());
    let around = first_line
        .and_then(|wanted| {
            groups.iter().position(|ops| {
                ops.iter().any(|op| {
                    op.iter_changes(&old, &new).any(|change| {
                        change.tag() == similar::ChangeTag::Insert
                            && change.value().trim_end() == wanted
                    })
                })
            })
        })
        .unwrap_or(0);
    let mut lines = Vec::new();
    for ops in groups.iter().skip(around) {
        if !lines.is_empty() {
            lines.push((' ', "…".to_owned()));
        }
        for op in ops {
            // Equal lines are shown as the end log has them.
            let changes: Vec<(char, &str)> = match *op {
                DiffOp::Equal { new_index, len, .. } => new[new_index..new_index + len]
                    .iter()
                    .map(|l| (' ', *l))
                    .collect(),
                _ => op
                    .iter_changes(&old, &new)
                    .map(|change| {
                        let line = change.value();
                        let tag = match change.tag() {
                            similar::ChangeTag::Delete => '-',
                            similar::ChangeTag::Insert => '+',
                            similar::ChangeTag::Equal => ' ',
                        };
                        (tag, line)
                    })
                    .collect(),
            };
            for (tag, line) in changes {
                lines.push((tag, line.to_owned()));
                if lines.len() >= DIFF_LINES {
                    lines.push((' ', "… (the rest is in the logs)".to_owned()));
                    return lines;
                }
            }
        }
    }
    lines
}

/// A log line with what differs between any two jobs replaced by placeholders.
fn comparable(line: &str) -> String {
    use std::sync::LazyLock;
    static JOB: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\S*/jobs/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
            .expect("a valid pattern")
    });
    static TOOLCHAIN: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"cargo \+\S+").expect("a valid pattern"));
    static TIME: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"\b\d+(?:\.\d+)?(?:s|ms)\b").expect("a valid pattern"));
    let line = JOB.replace_all(line, "<job>");
    let line = TOOLCHAIN.replace_all(&line, "cargo +<toolchain>");
    TIME.replace_all(&line, "<time>").into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compared(name: &str, category: &str) -> ComparedPackage {
        ComparedPackage {
            name: name.into(),
            version: "1.0.0".into(),
            category: category.into(),
            start: Some("build-pass".into()),
            end: Some("build-fail".into()),
            start_log: None,
            end_log: Some(format!("logs/{name}.txt")),
            end_rerun: None,
            end_rerun_log: None,
        }
    }

    fn row(name: &str, cause: &str) -> PackageRow {
        PackageRow {
            cause: Some(cause.into()),
            first_error: Some(format!("error: in {name}")),
            ..crate::tests::failed(name, "nightly")
        }
    }

    #[test]
    fn a_regressed_library_carries_the_crates_it_broke() {
        let compared = [
            compared("app", "regressed"),
            compared("core-lib", "regressed"),
            compared("leaf", "regressed"),
            compared("mid", "regressed"),
            compared("other", "regressed"),
            compared("uses-gone", "regressed"),
            compared("fine", "still-passing"),
        ];
        let rows = [
            row("app", "dependency core_lib"),
            row("core-lib", "E0308: mismatched types"),
            // Broken through mid, which core-lib broke: all three under core-lib.
            row("leaf", "dependency mid"),
            row("mid", "dependency core-lib"),
            row("other", "E0308: mismatched types"),
            row("uses-gone", "dependency not-in-run"),
        ];
        let dependents: HashMap<String, i64> = [
            ("mid".into(), 2),
            ("core-lib".into(), 3),
            ("other".into(), 7),
        ]
        .into();
        let groups = group(&compared, &rows, "nightly", &dependents);
        assert_eq!(groups.len(), 2, "{groups:#?}");
        let first = &groups[0];
        assert_eq!(first.cause, "E0308: mismatched types");
        assert_eq!(first.crates, 5);
        // The most depended-on root first, though it broke nothing.
        let roots: Vec<&str> = first.roots.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(roots, ["other", "core-lib"]);
        let broken: Vec<&str> = first.roots[1]
            .broken
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(broken, ["mid", "app", "leaf"]);
        assert_eq!(
            first.roots[1].first_error.as_deref(),
            Some("error: in core-lib")
        );
        assert_eq!(groups[1].cause, "dependency not-in-run");
        assert_eq!(groups[1].roots[0].name, "uses-gone");
    }

    #[test]
    fn a_cycle_of_blame_still_ends() {
        let compared = [compared("a", "regressed"), compared("b", "regressed")];
        let rows = [row("a", "dependency b"), row("b", "dependency a")];
        let groups = group(&compared, &rows, "nightly", &HashMap::new());
        let crates: usize = groups.iter().map(|g| g.crates).sum();
        assert_eq!(crates, 2, "{groups:#?}");
    }

    #[test]
    fn rerun_commands_repeat_the_experiment_and_compute_afresh() {
        let definition = serde_json::json!({
            "toolchains": ["1.95.0", "nightly-2026-11-30"],
            "experiment": {"mode": "test", "timeout_secs": 120, "memory_limit_mb": 2048,
                           "cap_lints": "warn"},
        });
        assert_eq!(
            rerun_command("beta-check", &definition, "regressed").unwrap(),
            "quarry-producer run --name beta-check-regressed --from-run beta-check --only \
             regressed --toolchain 1.95.0 --toolchain nightly-2026-11-30 --mode test --timeout \
             120 --memory-limit 2048 --cap-lints warn --fresh"
        );
        let command = serde_json::json!({
            "toolchains": ["stable"],
            "experiment": {"mode": "command", "timeout_secs": 60, "command": ["sh", "-c", "it's"]},
        });
        assert!(
            rerun_command("r", &command, "spurious")
                .unwrap()
                .ends_with("--fresh -- sh -c 'it'\\''s'")
        );
    }

    #[test]
    fn the_diff_shows_what_changed_around_the_first_error() {
        let start = "Checking a v1\nline 1\nline 2\nFinished\n";
        let end =
            "Checking a v1\nline 1\nerror[E0308]: mismatched types\n --> src/lib.rs\nline 2\n";
        let lines = log_diff(
            start,
            end,
            Some("error[E0308]: mismatched types\n --> src/lib.rs"),
        );
        let text: String = lines
            .iter()
            .map(|(tag, line)| format!("{tag} {line}\n"))
            .collect();
        assert!(
            text.contains("+ error[E0308]: mismatched types\n+  --> src/lib.rs\n"),
            "{text}"
        );
        assert!(text.contains("- Finished\n"), "{text}");
        assert!(text.contains("  line 1\n"), "{text}");
        // What differs between any two jobs is not a change.
        let start = "$ cargo +1.95.0 check\n   Compiling a (/w/a/jobs/3f2f7ae7-362c-5c87-ac0f-e63ddf93a03a/src/a)\n    Finished in 0.57s\n";
        let end = "$ cargo +nightly check\n   Compiling a (/w/b/jobs/f15b0771-80fa-5443-9d28-350a940fff45/src/a)\nerror: boom\n";
        let lines = log_diff(start, end, Some("error: boom"));
        let changed: Vec<&(char, String)> = lines.iter().filter(|(tag, _)| *tag != ' ').collect();
        assert_eq!(changed.len(), 2, "{lines:?}");
        assert_eq!(lines[0], (' ', "$ cargo +nightly check".to_owned()));
        let long_start: String = (0..1000).map(|i| format!("a{i}\n")).collect();
        let long_end: String = (0..1000).map(|i| format!("b{i}\n")).collect();
        assert!(log_diff(&long_start, &long_end, None).len() <= DIFF_LINES + 1);
    }
}
