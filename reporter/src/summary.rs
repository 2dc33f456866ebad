//! `summary.md`, what one pastes into a pull request or an issue: the counts, the regressions
//! grouped by root cause (the 20 that broke most crates), the commands that re-run them, then
//! flaky, spurious, broken and errored ones, and a link to the full report. It stays under
//! GitHub's comment limit ([`LIMIT`] characters) whatever the run's size: every list is cut
//! short, and what does not fit is named at the end as left out.
//!
//! Text from packages and logs goes into code spans whose fences outrun any backticks in it,
//! and table cells have their `|` escaped, so a crate's error message cannot reshape the page.

use std::fmt::Write as _;

use crate::{ComparedPackage, Report, progress_line};

/// GitHub's limit on a comment's body, in characters.
pub const LIMIT: usize = 65_536;
/// Kept free for the closing lines (what was left out, the link).
const RESERVE: usize = 2_000;
/// Root causes listed.
const GROUPS: usize = 20;
/// Crates listed per root cause, and dependents per crate.
const ROOTS: usize = 5;
const DEPENDENTS: usize = 5;
/// Crates listed per other kind (flaky, fixed, errored).
const LISTED: usize = 20;

/// The summary of `report`; `link` is where the full report is published.
pub fn render(report: &Report, link: Option<&str>) -> String {
    let mut md = Budget::new();
    md.line(&format!("## Quarry run {}", code(&report.run.name)));
    md.blank();
    md.line(&format!("{}.", progress_line(report)));
    md.blank();
    let cost = &report.cost;
    if cost.jobs > 0 {
        md.line(&format!(
            "Cost: {:.1} CPU-seconds over the {} of {} jobs that ran whose CPU time was \
             counted ({:.2} per job), at most {} MiB in one step, {} MiB of disk.",
            cost.cpu_seconds,
            cost.cpu_jobs,
            cost.jobs,
            cost.cpu_seconds_per_job,
            cost.peak_memory_bytes >> 20,
            cost.disk_bytes >> 20
        ));
        md.blank();
    }
    for (side, builds) in &report.run.builds {
        let builds: Vec<String> = builds.iter().map(|b| code(b)).collect();
        md.line(&format!("- {}: {}", code(side), builds.join(", ")));
    }
    if !report.run.builds.is_empty() {
        md.blank();
    }
    if let Some(comparison) = &report.comparison {
        md.line(&format!(
            "### {} → {}",
            code(&comparison.start),
            code(&comparison.end)
        ));
        md.blank();
        md.line("| category | packages |");
        md.line("|---|---:|");
        let mut categories: Vec<(&String, &i64)> = comparison.categories.iter().collect();
        categories.sort_by_key(|(category, _)| crate::category_rank(category));
        for (category, count) in categories {
            md.line(&format!("| {category} | {count} |"));
        }
        md.blank();
        regressions(&mut md, report, &comparison.end);
        for (category, heading) in [
            ("flaky", "Flaky: failed, then passed when run once more"),
            ("fixed", "Fixed"),
            ("error", "Error: Quarry could not run them"),
        ] {
            let listed: Vec<&ComparedPackage> = comparison
                .packages
                .iter()
                .filter(|p| p.category == category)
                .collect();
            if listed.is_empty() {
                continue;
            }
            md.line(&format!("#### {heading} ({})", listed.len()));
            md.blank();
            let shown = md.list(listed.iter().take(LISTED).map(|p| {
                let mut line = format!(
                    "- {}: {} → {}",
                    code(&format!("{}@{}", p.name, p.version)),
                    p.start.as_deref().unwrap_or("pending"),
                    p.end.as_deref().unwrap_or("pending")
                );
                if let Some(rerun) = &p.end_rerun {
                    let _ = write!(line, ", re-run: {rerun}");
                }
                line
            }));
            md.more(listed.len() - shown, category);
            md.blank();
        }
    } else {
        md.line("| outcome | jobs |");
        md.line("|---|---:|");
        for (outcome, count) in &report.counts {
            md.line(&format!("| {outcome} | {count} |"));
        }
        md.blank();
        if !report.causes.is_empty() {
            md.line("### Root causes of the failures");
            md.blank();
            md.line("| cause | failed jobs | for example |");
            md.line("|---|---:|---|");
            let shown = md.list(report.causes.iter().take(GROUPS).map(|g| {
                let examples: Vec<String> = g.jobs.iter().take(3).map(|j| code(j)).collect();
                format!(
                    "| {} | {} | {} |",
                    cell(&code(&g.cause)),
                    g.jobs.len(),
                    cell(&examples.join(", "))
                )
            }));
            md.more(report.causes.len() - shown, "root causes");
            md.blank();
        }
    }
    for (groups, heading) in [
        (
            &report.spurious,
            "Spurious: failed for a reason in the environment, not the code",
        ),
        (&report.broken, "Broken, by reason"),
    ] {
        if groups.is_empty() {
            continue;
        }
        md.line(&format!("### {heading}"));
        md.blank();
        md.line("| reason | jobs | for example |");
        md.line("|---|---:|---|");
        let shown = md.list(groups.iter().map(|g| {
            let examples: Vec<String> = g.jobs.iter().take(3).map(|j| code(j)).collect();
            format!(
                "| {} | {} | {} |",
                cell(&g.reason),
                g.jobs.len(),
                cell(&examples.join(", "))
            )
        }));
        md.more(groups.len() - shown, "reasons");
        md.blank();
    }
    if let Some(command) = report.reruns.get("spurious") {
        md.line("Re-run the spurious and flaky ones, computed afresh:");
        md.blank();
        md.block(command);
    }
    if !report.refused.is_empty() {
        md.line("### Refused: what packages tried that Quarry did not allow");
        md.blank();
        let shown = md.list(report.refused.iter().map(|g| {
            let examples: Vec<String> = g.jobs.iter().take(5).map(|j| code(j)).collect();
            format!(
                "- **{}** ({}): {}",
                g.refusal,
                g.jobs.len(),
                examples.join(", ")
            )
        }));
        md.more(report.refused.len() - shown, "refusals");
        md.blank();
    }
    md.finish(link)
}

/// The regressions, grouped by root cause, and the command that re-runs them.
fn regressions(md: &mut Budget, report: &Report, end: &str) {
    let crates: usize = report.regressions.iter().map(|g| g.crates).sum();
    md.line(&format!(
        "### Regressions: {crates} {}, {} root {}",
        crate::plural(crates, "crate", "crates"),
        report.regressions.len(),
        crate::plural(report.regressions.len(), "cause", "causes"),
    ));
    md.blank();
    if let Some(command) = report.reruns.get("regressed") {
        md.line("Re-run exactly the regressed crates, computed afresh:");
        md.blank();
        md.block(command);
    }
    let mut listed = 0;
    for (n, group) in report.regressions.iter().take(GROUPS).enumerate() {
        if !md.line(&format!(
            "#### {}. {} ({} {})",
            n + 1,
            code(&group.cause),
            group.crates,
            crate::plural(group.crates, "crate", "crates")
        )) {
            break;
        }
        listed += 1;
        md.blank();
        let shown = md.list(group.roots.iter().take(ROOTS).map(|root| {
            let mut line = format!(
                "- {}: {} → {}, {} in this run",
                code(&format!("{}@{}", root.name, root.version)),
                root.start.as_deref().unwrap_or("pending"),
                root.end.as_deref().unwrap_or("pending"),
                match root.dependents {
                    1 => "1 dependent".to_owned(),
                    n => format!("{n} dependents"),
                }
            );
            if let Some(error) = root.first_error.as_deref().and_then(|e| e.lines().next()) {
                let _ = write!(line, ": {}", code(error));
            }
            if !root.broken.is_empty() {
                let names: Vec<String> = root
                    .broken
                    .iter()
                    .take(DEPENDENTS)
                    .map(|d| code(&d.name))
                    .collect();
                let _ = write!(
                    line,
                    "; broke {} that depend on it: {}",
                    root.broken.len(),
                    names.join(", ")
                );
                if root.broken.len() > DEPENDENTS {
                    let _ = write!(line, ", … and {} more", root.broken.len() - DEPENDENTS);
                }
            }
            line
        }));
        md.more(
            group.roots.len() - shown,
            &format!("crates of this cause on {end}"),
        );
        md.blank();
    }
    if report.regressions.len() > listed {
        md.left_out(format!(
            "{} more root causes of regressions",
            report.regressions.len() - listed
        ));
    }
}

/// The markdown being written, within [`LIMIT`] less [`RESERVE`]; what did not fit is counted.
struct Budget {
    text: String,
    /// `text`'s length in characters.
    chars: usize,
    left_out: Vec<String>,
    full: bool,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            text: String::new(),
            chars: 0,
            left_out: Vec::new(),
            full: false,
        }
    }

    /// Adds a line if it fits; once one does not, nothing more is added but the closing lines.
    fn line(&mut self, line: &str) -> bool {
        let chars = line.chars().count() + 1;
        if self.full || self.chars + chars > LIMIT - RESERVE {
            self.full = true;
            return false;
        }
        self.chars += chars;
        self.text.push_str(line);
        self.text.push('\n');
        true
    }

    fn blank(&mut self) {
        self.line("");
    }

    /// Adds lines while they fit; returns how many did.
    fn list(&mut self, lines: impl Iterator<Item = String>) -> usize {
        let mut shown = 0;
        for line in lines {
            if !self.line(&line) {
                break;
            }
            shown += 1;
        }
        shown
    }

    /// Says that `n` more of a list were not shown.
    fn more(&mut self, n: usize, what: &str) {
        if n > 0 && !self.line(&format!("- … and {n} more {what}")) {
            self.left_out(format!("{n} more {what}"));
        }
    }

    /// A shell command in a fenced block.
    fn block(&mut self, command: &str) {
        let fence = "`".repeat(longest_run(command, '`').max(2) + 1);
        self.line(&format!("{fence}sh\n{command}\n{fence}"));
        self.blank();
    }

    fn left_out(&mut self, what: String) {
        self.left_out.push(what);
    }

    /// The text, with the link to the full report and what was left out.
    fn finish(mut self, link: Option<&str>) -> String {
        let mut closing = String::new();
        if self.full {
            closing.push_str(
                "\n_Cut short to stay under GitHub's comment limit: the full report has the rest._\n",
            );
        }
        for what in &self.left_out {
            let _ = writeln!(closing, "- left out: {what}");
        }
        match link {
            Some(link) => {
                let _ = writeln!(closing, "\n[The full report]({})", link.replace(')', "%29"));
            }
            None => closing.push_str("\nThe full report: `index.html` beside this file.\n"),
        }
        // The reserve holds the closing lines; a huge list of what was left out is cut too.
        let room = LIMIT - 1 - self.chars;
        if closing.chars().count() > room {
            closing = closing
                .chars()
                .take(room.saturating_sub(2))
                .collect::<String>()
                + "…\n";
        }
        self.text.push_str(&closing);
        self.text
    }
}

/// `text` as an inline code span: fenced with more backticks than any run inside it, and on
/// one line.
fn code(text: &str) -> String {
    let text = text.replace(['\n', '\r'], " ");
    let fence = "`".repeat(longest_run(&text, '`') + 1);
    let pad = if text.starts_with('`') || text.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{text}{pad}{fence}")
}

/// A table cell's text: a `|` would end the cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn longest_run(text: &str, c: char) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for ch in text.chars() {
        if ch == c {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_hold_backticks_and_cells_hold_bars() {
        assert_eq!(code("plain"), "`plain`");
        assert_eq!(code("cannot find `x`"), "`` cannot find `x` ``");
        assert_eq!(code("a\nb"), "`a b`");
        assert_eq!(cell("a | b"), "a \\| b");
    }

    #[test]
    fn a_budget_stops_adding_and_says_what_it_left_out() {
        let mut md = Budget::new();
        let shown = md.list((0..100_000).map(|i| format!("- line {i} {}", "x".repeat(50))));
        assert!(shown < 100_000);
        md.more(100_000 - shown, "lines");
        let text = md.finish(Some("https://q.example/reports/r/index.html"));
        assert!(text.chars().count() < LIMIT);
        assert!(text.contains("Cut short"), "{}", &text[text.len() - 500..]);
        assert!(text.contains("more lines"));
        assert!(text.ends_with("[The full report](https://q.example/reports/r/index.html)\n"));
    }

    /// A run of 100,000 results with every section overfull: thousands of root causes, long
    /// error messages full of backticks, hundreds of spurious and broken reasons.
    #[test]
    fn the_summary_of_a_hundred_thousand_results_fits_in_a_comment() {
        use crate::{
            ComparedPackage, Comparison, PackageRow, ReasonGroup, RefusalGroup, Regression,
            RegressionGroup,
        };
        let long = |i: usize| format!("a long crate name number {i:06} {}", "x".repeat(40));
        let categories = ["regressed", "flaky", "fixed", "error", "still-passing"];
        let compared: Vec<ComparedPackage> = (0..50_000)
            .map(|i| ComparedPackage {
                name: long(i),
                version: "1.0.0".into(),
                category: categories[i % categories.len()].into(),
                start: Some("build-pass".into()),
                end: Some("build-fail".into()),
                start_log: None,
                end_log: None,
                end_rerun: Some("build-pass".into()),
                end_rerun_log: None,
            })
            .collect();
        let packages: Vec<PackageRow> = (0..100_000)
            .map(|i| PackageRow {
                cause: Some(format!("E{:04}: `cause` {i}", i % 10_000)),
                ..crate::tests::failed(&long(i / 2), if i % 2 == 0 { "start" } else { "end" })
            })
            .collect();
        let error = format!(
            "error[E0308]: mismatched ``types`` |{}|\n --> src/lib.rs",
            "y".repeat(1400)
        );
        let regression = |name: String| Regression {
            dependents: 7,
            first_error: Some(error.clone()),
            ..crate::tests::regression(&name)
        };
        let regressions: Vec<RegressionGroup> = (0..3_000)
            .map(|g| RegressionGroup {
                cause: format!("E{g:04}: {} `with` | bars", "z".repeat(110)),
                crates: 33,
                roots: (0..3)
                    .map(|r| Regression {
                        broken: (0..10).map(|d| regression(long(d))).collect(),
                        ..regression(long(g * 3 + r))
                    })
                    .collect(),
            })
            .collect();
        let reasons = |what: &str| -> Vec<ReasonGroup> {
            (0..500)
                .map(|i| ReasonGroup {
                    reason: format!("{what} {i} {}", "w".repeat(80)),
                    jobs: (0..100).map(long).collect(),
                })
                .collect()
        };
        let mut report = crate::tests::report_of(packages);
        report.run.name = "huge".into();
        report.counts.insert("build-fail".to_owned(), 100_000);
        report.comparison = Some(Comparison {
            start: "start".into(),
            end: "end".into(),
            categories: categories.iter().map(|c| (c.to_string(), 10_000)).collect(),
            packages: compared,
        });
        report.regressions = regressions;
        report.reruns = [
            (
                "regressed".to_owned(),
                "quarry-producer run --name huge-regressed".to_owned(),
            ),
            (
                "spurious".to_owned(),
                "quarry-producer run --name huge-spurious".to_owned(),
            ),
        ]
        .into();
        report.refused = (0..50)
            .map(|i| RefusalGroup {
                refusal: format!("refusal-{i}"),
                jobs: (0..1000).map(long).collect(),
            })
            .collect();
        report.broken = reasons("broken");
        report.spurious = reasons("spurious");
        let md = render(
            &report,
            Some("https://quarry.example.org/reports/huge/index.html"),
        );
        let chars = md.chars().count();
        assert!(chars < LIMIT, "{chars} characters");
        assert!(
            chars > LIMIT - RESERVE - 2_000,
            "it uses the room it has: {chars}"
        );
        assert!(md.contains("#### 1. ``E0000: "), "{}", &md[..2000]);
        assert!(md.contains("```sh\nquarry-producer run --name huge-regressed\n```"));
        assert!(
            md.contains("more root causes of regressions"),
            "{}",
            &md[md.len() - 3000..]
        );
        assert!(md.contains("Cut short to stay under GitHub's comment limit"));
        assert!(
            md.ends_with("[The full report](https://quarry.example.org/reports/huge/index.html)\n")
        );
        // Fences outrun the backticks inside.
        assert!(
            md.contains(": ```error[E0308]: mismatched ``types`` |"),
            "{}",
            &md[..3000]
        );
    }
}
