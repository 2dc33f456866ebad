//! The report's HTML, a static site that opens offline and stays quick for a million results:
//! `index.html` holds only the summary (counts and their chart, durations, root causes, links),
//! and every list of packages is cut into pages of [`PAGE_ROWS`] rows: one series per outcome
//! and per category that needs a look (what passed is only in the list of every job), per root
//! cause, and one of every job. The search box loads the name index (`search.js`, a script rather
//! than JSON so that it also loads from `file://`) only when used. `package.html#NAME` is the page
//! of one package (every version and toolchain, outcomes, causes, logs), filled in from the
//! slice of `packages/data-<n>.js` that holds it.
//!
//! Everything taken from a package or a log is escaped; the search results are built with DOM
//! calls (`textContent`, `href`), never markup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::{ComparedPackage, PackageRow, Report, escape_href, escape_html, progress_line};

/// Rows per list page.
pub const PAGE_ROWS: usize = 1000;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;}\
    table{border-collapse:collapse;}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;}\
    .build-pass,.test-pass,.still-passing,.fixed{color:#16691c;}\
    .build-fail,.test-fail,.broken,.regressed,.regressed-ice,.still-failing{color:#a11;}\
    .error,.timeout,.out-of-memory,.spurious-regressed,.spurious-fixed{color:#a60;}\
    .bar{display:inline-block;height:.8em;background:#69c;vertical-align:middle;}\
    nav{margin:1em 0;}\
    pre{background:#f6f6f6;padding:.4em .6em;white-space:pre-wrap;overflow-wrap:anywhere;}\
    .cause{border-left:4px solid #a11;padding-left:1em;margin:1em 0;}\
    .root{margin:.6em 0;}.add{color:#16691c;}.del{color:#a11;}\
    code.command{display:block;background:#f6f6f6;padding:.4em .6em;overflow-wrap:anywhere;}";

/// The most root-cause groups, roots per group and dependents per root shown on the first page;
/// the rest are a click away in the category's pages.
const SHOWN_GROUPS: usize = 50;
const SHOWN_ROOTS: usize = 20;
const SHOWN_DEPENDENTS: usize = 20;

/// Writes `index.html` and every list page under `dir`; returns the path of `index.html`.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<std::path::PathBuf> {
    let mut index = head(&format!("Quarry report: {}", report.run.name), "");
    let e = escape_html;
    let _ = write!(
        index,
        "<h1>Run {name}</h1>\n<p>{id} · created {created} · {progress}</p>\n",
        name = e(&report.run.name),
        id = e(&report.run.id),
        created = e(&report.run.created_at),
        progress = e(&progress_line(report)),
    );
    if !report.run.builds.is_empty() {
        index.push_str("<table id=\"builds\"><tr><th>side</th><th>toolchain build</th></tr>\n");
        for (side, builds) in &report.run.builds {
            let _ = writeln!(
                index,
                "<tr><td>{}</td><td>{}</td></tr>",
                e(side),
                e(&builds.join(", "))
            );
        }
        index.push_str("</table>\n");
    }
    search_box(&mut index, report);
    regressions(&mut index, dir, report)?;

    if let Some(comparison) = &report.comparison {
        let by_category = group(
            comparison
                .packages
                .iter()
                .filter(|p| p.category != "still-passing"),
            |p| p.category.clone(),
        );
        let largest = comparison.categories.values().copied().max().unwrap_or(0);
        let _ = write!(
            index,
            "<h2>{} → {}</h2>\n<table id=\"categories\"><tr><th>category</th><th>packages</th><th></th></tr>\n",
            e(&comparison.start),
            e(&comparison.end)
        );
        let mut categories: Vec<(&String, &i64)> = comparison.categories.iter().collect();
        categories.sort_by_key(|(category, _)| crate::category_rank(category));
        for (category, count) in categories {
            let header = [
                "package".to_owned(),
                "version".to_owned(),
                "category".to_owned(),
                e(&comparison.start),
                e(&comparison.end),
            ];
            let pages = match by_category.get(category) {
                Some(rows) => write_pages(
                    &dir.join("categories"),
                    category,
                    &format!("{}: {category}", report.run.name),
                    &header,
                    rows,
                    compared_row,
                )?,
                None => 0,
            };
            let _ = writeln!(
                index,
                "<tr class=\"{c}\"><td>{}</td><td data-category=\"{c}\">{count}</td><td>{}</td></tr>",
                linked(&format!("categories/{category}-1.html"), category, pages),
                bar(*count, largest),
                c = e(category)
            );
        }
        index.push_str("</table>\n");
    }

    // Outcomes, each but the passing ones with its pages.
    let by_outcome = group(
        report.packages.iter().filter(|p| !is_passing(&p.outcome)),
        |p| p.outcome.clone(),
    );
    let largest = report.counts.values().copied().max().unwrap_or(0);
    index.push_str(
        "<h2>Outcomes</h2>\n<table id=\"counts\"><tr><th>outcome</th><th>jobs</th><th></th></tr>\n",
    );
    for (outcome, count) in &report.counts {
        let pages = match by_outcome.get(outcome) {
            Some(rows) => write_pages(
                &dir.join("outcomes"),
                outcome,
                &format!("{}: {outcome}", report.run.name),
                &package_header(),
                rows,
                package_row,
            )?,
            None => 0,
        };
        let _ = writeln!(
            index,
            "<tr class=\"{o}\"><td>{}</td><td data-count=\"{o}\">{count}</td><td>{}</td></tr>",
            linked(&format!("outcomes/{outcome}-1.html"), outcome, pages),
            bar(*count, largest),
            o = e(outcome)
        );
    }
    index.push_str("</table>\n");

    durations(&mut index, &report.packages);
    cost(&mut index, &report.cost);

    if !report.causes.is_empty() {
        let by_cause = group(report.packages.iter().filter(|p| p.cause.is_some()), |p| {
            p.cause.clone().unwrap_or_default()
        });
        let groups: Vec<(&str, &[String])> = report
            .causes
            .iter()
            .map(|g| (g.cause.as_str(), g.jobs.as_slice()))
            .collect();
        grouped_table(
            &mut index,
            dir,
            &Grouping {
                heading: "Root causes",
                id: "cause",
                title: &format!("{}: failed because of", report.run.name),
                jobs: "failed jobs",
            },
            &groups,
            |cause| by_cause.get(cause).cloned().unwrap_or_default(),
        )?;
    }
    if !report.broken.is_empty() {
        grouped_table(
            &mut index,
            dir,
            &Grouping {
                heading: "Broken, by reason",
                id: "broken",
                title: &format!("{}: broken because of", report.run.name),
                jobs: "broken jobs",
            },
            &reason_groups(&report.broken),
            |reason| {
                report
                    .packages
                    .iter()
                    .filter(|p| {
                        p.outcome == "broken"
                            && p.broken_reason.as_deref().unwrap_or("unknown") == reason
                    })
                    .collect()
            },
        )?;
    }
    if !report.spurious.is_empty() {
        grouped_table(
            &mut index,
            dir,
            &Grouping {
                heading: "Spurious: failed for a reason in the environment, not the code",
                id: "spurious",
                title: &format!("{}: failed because of the environment", report.run.name),
                jobs: "jobs",
            },
            &reason_groups(&report.spurious),
            |kind| {
                report
                    .packages
                    .iter()
                    .filter(|p| p.spurious().as_deref() == Some(kind))
                    .collect()
            },
        )?;
    }
    if !report.refused.is_empty() {
        let groups: Vec<(&str, &[String])> = report
            .refused
            .iter()
            .map(|g| (g.refusal.as_str(), g.jobs.as_slice()))
            .collect();
        grouped_table(
            &mut index,
            dir,
            &Grouping {
                heading: "Refused: what packages tried that Quarry did not allow",
                id: "refused",
                title: &format!("{}: refused", report.run.name),
                jobs: "jobs",
            },
            &groups,
            |refusal| {
                report
                    .packages
                    .iter()
                    .filter(|p| p.refused.iter().any(|r| r == refusal))
                    .collect()
            },
        )?;
    }

    let all: Vec<&PackageRow> = report.packages.iter().collect();
    let pages = write_pages(
        &dir.join("packages"),
        "all",
        &format!("{}: every job", report.run.name),
        &package_header(),
        &all,
        package_row,
    )?;
    let _ = writeln!(
        index,
        "<h2>Every job</h2>\n<p>{} jobs, {}.</p>",
        report.packages.len(),
        linked(
            "packages/all-1.html",
            &format!(
                "{pages} {} of {PAGE_ROWS}",
                crate::plural(pages, "page", "pages")
            ),
            pages
        )
    );
    write_search_index(dir, &report.packages)?;
    write_package_data(dir, report)?;
    let path = dir.join("package.html");
    std::fs::write(&path, package_page(&report.run.name))
        .with_context(|| format!("cannot write {}", path.display()))?;
    index.push_str("</body></html>\n");
    let path = dir.join("index.html");
    std::fs::write(&path, index).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn head(title: &str, root: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <link rel=\"icon\" href=\"data:,\"><title>{}</title><style>{STYLE}</style></head><body>\n\
         {}",
        escape_html(title),
        if root.is_empty() {
            String::new()
        } else {
            format!("<p><a href=\"{root}index.html\">← summary</a></p>\n")
        }
    )
}

/// `text` linking to `href`, or plain when there is nothing there.
fn linked(href: &str, text: &str, pages: usize) -> String {
    if pages == 0 {
        escape_html(text)
    } else {
        format!(
            "<a href=\"{}\">{}</a>",
            escape_html(&escape_href(href)),
            escape_html(text)
        )
    }
}

fn bar(count: i64, largest: i64) -> String {
    // At least a sliver for any count, so that a small one still shows against a large one.
    let width = if count > 0 && largest > 0 {
        (count as f64 / largest as f64 * 20.0).max(0.1)
    } else {
        0.0
    };
    format!("<span class=\"bar\" style=\"width:{width:.1}em\"></span>")
}

/// A summary table of groups of jobs (root causes, refusals).
struct Grouping<'a> {
    heading: &'a str,
    /// The table's id, the `data-` attribute of its counts, and its pages' directory
    /// (`<id>s/`).
    id: &'a str,
    /// Its pages' title, before the group's name.
    title: &'a str,
    /// What the count column counts.
    jobs: &'a str,
}

/// Writes `groups` (a name and its jobs, largest first) as a table: each name linked to its
/// pages of jobs (`rows_of(name)`), how many, and a few examples.
fn grouped_table<'r>(
    index: &mut String,
    dir: &Path,
    grouping: &Grouping<'_>,
    groups: &[(&str, &[String])],
    rows_of: impl Fn(&str) -> Vec<&'r PackageRow>,
) -> anyhow::Result<()> {
    let e = escape_html;
    let id = grouping.id;
    let _ = writeln!(
        index,
        "<h2>{}</h2>\n<table id=\"{id}s\"><tr><th>{id}</th><th>{}</th><th>for example</th></tr>",
        e(grouping.heading),
        e(grouping.jobs),
    );
    for (i, (name, jobs)) in groups.iter().enumerate() {
        let stem = format!("{id}-{}", i + 1);
        let rows = rows_of(name);
        let pages = if rows.is_empty() {
            0
        } else {
            write_pages(
                &dir.join(format!("{id}s")),
                &stem,
                &format!("{} {name}", grouping.title),
                &package_header(),
                &rows,
                package_row,
            )?
        };
        let examples: Vec<&str> = jobs.iter().take(5).map(String::as_str).collect();
        let _ = writeln!(
            index,
            "<tr><td>{}</td><td data-{id}=\"{n}\">{}</td><td>{}</td></tr>",
            linked(&format!("{id}s/{stem}-1.html"), name, pages),
            jobs.len(),
            e(&examples.join(", ")),
            n = e(name),
        );
    }
    index.push_str("</table>\n");
    Ok(())
}

fn is_passing(outcome: &str) -> bool {
    matches!(outcome, "build-pass" | "test-pass")
}

fn group<'a, T>(
    items: impl Iterator<Item = &'a T>,
    key: impl Fn(&T) -> String,
) -> BTreeMap<String, Vec<&'a T>> {
    let mut groups: BTreeMap<String, Vec<&T>> = BTreeMap::new();
    for item in items {
        groups.entry(key(item)).or_default().push(item);
    }
    groups
}

fn package_header() -> [String; 10] {
    [
        "package",
        "version",
        "side",
        "outcome",
        "exit",
        "seconds",
        "CPU seconds",
        "peak MiB",
        "attempt",
        "log",
    ]
    .map(str::to_owned)
}

/// A link to a log from a page one directory below the report's root.
fn log_link(log: Option<&str>, text: &str, class: &str) -> String {
    match log {
        Some(log) => format!(
            "<a class=\"{class}\" href=\"../{}\">{}</a>",
            escape_html(&escape_href(log)),
            escape_html(text)
        ),
        None => format!(
            "<span class=\"{class}\" title=\"log in S3: quarry-reporter explain\">{}</span>",
            escape_html(text)
        ),
    }
}

fn package_row(p: &PackageRow, html: &mut String) {
    let e = escape_html;
    let _ = writeln!(
        html,
        "<tr id=\"{id}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"{o}\">{o}</td><td>{}</td>\
         <td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        package_link(&p.name),
        e(&p.version),
        e(&p.side),
        p.exit_code.map_or_else(String::new, |c| c.to_string()),
        p.duration_ms as f64 / 1000.0,
        p.cost
            .as_ref()
            .and_then(|c| c.cpu_ms)
            .map_or_else(String::new, |ms| format!("{:.1}", ms as f64 / 1000.0)),
        p.cost
            .as_ref()
            .and_then(|c| c.peak_memory_bytes)
            .map_or_else(String::new, |bytes| (bytes >> 20).to_string()),
        p.attempt,
        log_link(p.log.as_deref(), "log", ""),
        id = e(&p.name),
        o = e(&p.outcome),
    );
}

fn compared_row(p: &ComparedPackage, html: &mut String) {
    let e = escape_html;
    let side = |outcome: &Option<String>, log: &Option<String>| match outcome {
        Some(outcome) => log_link(log.as_deref(), outcome, &e(outcome)),
        None => "pending".to_owned(),
    };
    let _ = writeln!(
        html,
        "<tr id=\"{}\"><td>{}</td><td>{}</td><td class=\"{c}\">{c}</td><td>{}</td><td>{}</td></tr>",
        e(&p.name),
        package_link(&p.name),
        e(&p.version),
        side(&p.start, &p.start_log),
        match &p.end_rerun {
            // The re-run that confirmed the regression or showed it flaky, beside the first.
            Some(_) => format!(
                "{} · re-run: {}",
                side(&p.end, &p.end_log),
                side(&p.end_rerun, &p.end_rerun_log)
            ),
            None => side(&p.end, &p.end_log),
        },
        c = e(&p.category),
    );
}

/// Writes `rows` as `<dir>/<stem>-<n>.html`, [`PAGE_ROWS`] to a page, each page linking to its
/// neighbours; returns how many pages.
fn write_pages<T>(
    dir: &Path,
    stem: &str,
    title: &str,
    header: &[String],
    rows: &[&T],
    row: fn(&T, &mut String),
) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pages = rows.len().div_ceil(PAGE_ROWS);
    for (i, chunk) in rows.chunks(PAGE_ROWS).enumerate() {
        let n = i + 1;
        let page_title = format!("{title} ({n} of {pages})");
        let mut html = head(&page_title, "../");
        let _ = writeln!(html, "<h1>{}</h1>", escape_html(&page_title));
        let nav = {
            let mut nav = String::from("<nav>");
            let link = |to: usize, text: &str| {
                format!(
                    "<a href=\"{}\">{text}</a>",
                    escape_html(&escape_href(&format!("{stem}-{to}.html")))
                )
            };
            if n > 1 {
                nav.push_str(&link(n - 1, "← previous"));
                nav.push(' ');
            }
            let _ = write!(
                nav,
                "rows {}–{} of {}",
                i * PAGE_ROWS + 1,
                i * PAGE_ROWS + chunk.len(),
                rows.len()
            );
            if n < pages {
                nav.push(' ');
                nav.push_str(&link(n + 1, "next →"));
            }
            nav.push_str("</nav>\n");
            nav
        };
        html.push_str(&nav);
        html.push_str("<table><tr>");
        for cell in header {
            let _ = write!(html, "<th>{cell}</th>");
        }
        html.push_str("</tr>\n");
        for item in chunk {
            row(item, &mut html);
        }
        html.push_str("</table>\n");
        html.push_str(&nav);
        html.push_str("</body></html>\n");
        let path = dir.join(format!("{stem}-{n}.html"));
        std::fs::write(&path, html).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(pages)
}

/// A chart of how long jobs took.
fn durations(html: &mut String, packages: &[PackageRow]) {
    const BUCKETS: [(i64, &str); 6] = [
        (1_000, "under 1 s"),
        (10_000, "1–10 s"),
        (60_000, "10 s – 1 min"),
        (600_000, "1–10 min"),
        (3_600_000, "10 min – 1 h"),
        (i64::MAX, "over 1 h"),
    ];
    let mut counts = [0i64; BUCKETS.len()];
    for p in packages {
        let bucket = BUCKETS
            .iter()
            .position(|(limit, _)| p.duration_ms < *limit)
            .unwrap_or(BUCKETS.len() - 1);
        counts[bucket] += 1;
    }
    let largest = counts.iter().copied().max().unwrap_or(0);
    html.push_str(
        "<h2>Durations</h2>\n<table id=\"durations\"><tr><th>took</th><th>jobs</th><th></th></tr>\n",
    );
    for ((_, label), count) in BUCKETS.iter().zip(counts) {
        let _ = writeln!(
            html,
            "<tr><td>{label}</td><td>{count}</td><td>{}</td></tr>",
            bar(count, largest)
        );
    }
    html.push_str("</table>\n");
}

/// A job's cost in a line: `CPU 4.2 s, peak 310 MiB, disk 88 MiB; fetch 0.1 s, check 4.1 s`
/// (each step's wall-clock time).
fn cost_text(cost: &quarry_core::cost::Cost) -> String {
    let steps: Vec<String> = cost
        .steps
        .iter()
        .map(|s| format!("{} {:.1} s", s.name, s.wall_ms as f64 / 1000.0))
        .collect();
    format!(
        "CPU {}, peak {}, disk {} MiB; {}",
        cost.cpu_ms.map_or_else(
            || "not counted".to_owned(),
            |ms| format!("{:.1} s", ms as f64 / 1000.0)
        ),
        cost.peak_memory_bytes.map_or_else(
            || "not counted".to_owned(),
            |bytes| format!("{} MiB", bytes >> 20)
        ),
        cost.disk_bytes >> 20,
        steps.join(", ")
    )
}

/// What the run's jobs used, and per step.
fn cost(html: &mut String, cost: &crate::RunCost) {
    if cost.jobs == 0 {
        return;
    }
    let mib = |bytes: u64| bytes >> 20;
    let _ = writeln!(
        html,
        "<h2>Cost</h2>\n<p>Over the <span data-count=\"cost-jobs\">{jobs}</span> jobs that ran \
         (a reused result ran nothing).</p>\n<table id=\"cost\">\n\
         <tr><td>CPU time (user and system), of the {cpu_jobs} jobs it was counted for</td>\
         <td data-cost=\"cpu-seconds\">{cpu:.1} s</td></tr>\n\
         <tr><td>CPU time per job</td><td data-cost=\"cpu-seconds-per-job\">{per_job:.2} s</td></tr>\n\
         <tr><td>wall-clock time, summed</td><td>{wall:.1} s</td></tr>\n\
         <tr><td>most memory of one step</td><td>{peak} MiB</td></tr>\n\
         <tr><td>disk at the jobs' end, summed (largest)</td><td>{disk} MiB ({largest} MiB)</td></tr>\n\
         <tr><td>waiting for a slot, summed</td><td>{wait:.1} s</td></tr>\n</table>",
        jobs = cost.jobs,
        cpu_jobs = cost.cpu_jobs,
        cpu = cost.cpu_seconds,
        per_job = cost.cpu_seconds_per_job,
        wall = cost.wall_seconds,
        peak = mib(cost.peak_memory_bytes),
        disk = mib(cost.disk_bytes),
        largest = mib(cost.largest_disk_bytes),
        wait = cost.slot_wait_seconds,
    );
    html.push_str("<table id=\"step-cost\"><tr><th>step</th><th>CPU seconds</th></tr>\n");
    for (step, seconds) in &cost.steps {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{seconds:.1}</td></tr>",
            escape_html(step)
        );
    }
    html.push_str("</table>\n");
}

/// The search box; its script loads `search.js` (every package name and the page of `packages/`
/// listing it) on first use.
fn search_box(html: &mut String, report: &Report) {
    if report.packages.is_empty() {
        return;
    }
    html.push_str(
        "<form id=\"search\"><input id=\"q\" placeholder=\"crate name\" aria-label=\"crate name\"> \
         <button>Find</button></form><ul id=\"found\"></ul>\n\
         <script>\n\
         let names = null;\n\
         function quarrySearch(index) { names = index; find(); }\n\
         function find() {\n\
           const q = document.getElementById('q').value.trim().toLowerCase();\n\
           const found = document.getElementById('found');\n\
           found.replaceChildren();\n\
           if (!q) return;\n\
           let shown = 0;\n\
           for (const [name, page] of names) {\n\
             if (!name.toLowerCase().includes(q)) continue;\n\
             const item = document.createElement('li');\n\
             const link = document.createElement('a');\n\
             link.href = 'package.html#' + encodeURIComponent(name);\n\
             link.textContent = name;\n\
             item.append(link);\n\
             found.append(item);\n\
             if (++shown === 100) break;\n\
           }\n\
           if (shown === 0) found.textContent = 'no crate matches';\n\
         }\n\
         document.getElementById('search').addEventListener('submit', (event) => {\n\
           event.preventDefault();\n\
           if (names) { find(); return; }\n\
           const script = document.createElement('script');\n\
           script.src = 'search.js';\n\
           document.head.append(script);\n\
         });\n\
         </script>\n",
    );
}

/// `search.js`: `quarrySearch([[name, page], ...])`, one entry per crate name.
fn write_search_index(dir: &Path, packages: &[PackageRow]) -> anyhow::Result<()> {
    let mut index: Vec<(&str, usize)> = Vec::new();
    for (i, p) in packages.iter().enumerate() {
        if index.last().is_none_or(|(name, _)| *name != p.name) {
            index.push((&p.name, i / PAGE_ROWS + 1));
        }
    }
    let mut js = String::from("quarrySearch(");
    js.push_str(&serde_json::to_string(&index)?);
    js.push_str(");\n");
    let path = dir.join("search.js");
    std::fs::write(&path, js).with_context(|| format!("cannot write {}", path.display()))
}

/// A package's name linking to its page, from a page one directory below the root.
fn package_link(name: &str) -> String {
    let mut fragment = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
            fragment.push(b as char);
        } else {
            let _ = write!(fragment, "%{b:02X}");
        }
    }
    format!(
        "<a href=\"../package.html#{fragment}\">{}</a>",
        escape_html(name)
    )
}

/// `packages/data-<n>.js`: the jobs of `packages/all-<n>.html`, as
/// `quarryPackages([[name, version, toolchain, outcome, exit code, milliseconds, attempt, log,
/// cause, category], ...])`.
fn write_package_data(dir: &Path, report: &Report) -> anyhow::Result<()> {
    let categories: std::collections::HashMap<(&str, &str), &str> = report
        .comparison
        .iter()
        .flat_map(|c| c.packages.iter())
        .map(|p| ((p.name.as_str(), p.version.as_str()), p.category.as_str()))
        .collect();
    let packages = dir.join("packages");
    std::fs::create_dir_all(&packages)
        .with_context(|| format!("cannot create {}", packages.display()))?;
    for (i, chunk) in report.packages.chunks(PAGE_ROWS).enumerate() {
        let rows: Vec<serde_json::Value> = chunk
            .iter()
            .map(|p| {
                serde_json::json!([
                    p.name,
                    p.version,
                    p.side,
                    p.outcome,
                    p.exit_code,
                    p.duration_ms,
                    p.attempt,
                    p.log.as_deref().map(escape_href),
                    p.cause,
                    categories.get(&(p.name.as_str(), p.version.as_str())),
                    p.cost.as_ref().map(cost_text),
                ])
            })
            .collect();
        let path = packages.join(format!("data-{}.js", i + 1));
        let js = format!("quarryPackages({});\n", serde_json::to_string(&rows)?);
        std::fs::write(&path, js).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The page of one package, named by the URL's fragment; built with DOM calls only.
fn package_page(run: &str) -> String {
    let mut html = head(&format!("Quarry report: {run}"), "");
    html.push_str(
        "<p><a href=\"index.html\">← summary</a></p>\n\
         <h1 id=\"name\"></h1><p id=\"status\">loading…</p>\n\
         <table id=\"rows\" hidden><tr><th>version</th><th>side</th><th>outcome</th>\
         <th>category</th><th>exit</th><th>seconds</th><th>attempt</th><th>cause</th><th>cost</th>\
         <th>log</th></tr></table>\n\
         <script>\n\
         const name = decodeURIComponent(location.hash.slice(1));\n\
         const status = (text) => { document.getElementById('status').textContent = text; };\n\
         document.getElementById('name').textContent = name;\n\
         function load(src) {\n\
           const script = document.createElement('script');\n\
           script.src = src;\n\
           document.head.append(script);\n\
         }\n\
         function quarrySearch(index) {\n\
           const entry = index.find(([n]) => n === name);\n\
           if (entry) load('packages/data-' + entry[1] + '.js');\n\
           else status(name ? 'no package of that name in this run' : 'no package named');\n\
         }\n\
         function quarryPackages(data) {\n\
           const table = document.getElementById('rows');\n\
           for (const [n, version, toolchain, outcome, exit, ms, attempt, log, cause, category, cost] of data) {\n\
             if (n !== name) continue;\n\
             const row = table.insertRow();\n\
             for (const text of [version, toolchain, outcome, category ?? '', exit ?? '',\n\
                                 (ms / 1000).toFixed(1), attempt, cause ?? '', cost ?? '']) {\n\
               row.insertCell().textContent = text;\n\
             }\n\
             row.cells[2].className = outcome;\n\
             const cell = row.insertCell();\n\
             if (log) {\n\
               const link = document.createElement('a');\n\
               link.href = log;\n\
               link.textContent = 'log';\n\
               cell.append(link);\n\
             } else {\n\
               cell.textContent = 'in S3';\n\
             }\n\
           }\n\
           table.hidden = false;\n\
           status('');\n\
         }\n\
         window.addEventListener('hashchange', () => location.reload());\n\
         load('search.js');\n\
         </script>\n</body></html>\n",
    );
    html
}

fn reason_groups(groups: &[crate::ReasonGroup]) -> Vec<(&str, &[String])> {
    groups
        .iter()
        .map(|g| (g.reason.as_str(), g.jobs.as_slice()))
        .collect()
}

/// The first section of a two-side run's page: its regressions grouped by root cause, each
/// root with its first error, its logs, its page and the crates it broke under it; and the
/// commands that re-run them. Writes each root's page (see [`regression_page`]).
fn regressions(index: &mut String, dir: &Path, report: &Report) -> anyhow::Result<()> {
    let Some(comparison) = &report.comparison else {
        return Ok(());
    };
    let e = escape_html;
    let crates: usize = report.regressions.iter().map(|g| g.crates).sum();
    let _ = writeln!(
        index,
        "<h2 id=\"regressions\">Regressions: <span data-count=\"regressed-crates\">{crates}</span> \
         {}, <span data-count=\"root-causes\">{}</span> root {}</h2>",
        crate::plural(crates, "crate", "crates"),
        report.regressions.len(),
        crate::plural(report.regressions.len(), "cause", "causes"),
    );
    if report.regressions.is_empty() {
        let _ = writeln!(
            index,
            "<p>Nothing that passed with {} fails with {}.</p>",
            e(&comparison.start),
            e(&comparison.end)
        );
    }
    for (only, command) in &report.reruns {
        let _ = writeln!(
            index,
            "<p>Re-run the {only} crates, computed afresh:</p><code class=\"command\" \
             data-rerun=\"{only}\">{}</code>",
            e(command),
            only = e(only),
        );
    }
    let regressions_dir = dir.join("regressed");
    for (g, group) in report.regressions.iter().enumerate() {
        let shown = g < SHOWN_GROUPS;
        if shown {
            let _ = writeln!(
                index,
                "<div class=\"cause\" data-group=\"{cause}\"><h3>{cause} · \
                 <span data-count=\"group-{n}\">{}</span> {}</h3>\n<ol>",
                group.crates,
                crate::plural(group.crates, "crate", "crates"),
                cause = e(&group.cause),
                n = g + 1,
            );
        }
        for (r, root) in group.roots.iter().enumerate() {
            let page = &root.page;
            for (regression, broken_by) in std::iter::once((root, None))
                .chain(root.broken.iter().map(|d| (d, Some(root.name.as_str()))))
            {
                if let Some(page) = &regression.page {
                    std::fs::create_dir_all(&regressions_dir)
                        .with_context(|| format!("cannot create {}", regressions_dir.display()))?;
                    let html = regression_page(dir, report, &group.cause, regression, broken_by);
                    let path = dir.join(page);
                    std::fs::write(&path, html)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
            }
            if !shown || r >= SHOWN_ROOTS {
                continue;
            }
            let _ = write!(
                index,
                "<li class=\"root\" data-root=\"{name}\">{} {} · <span class=\"{c}\">{c}</span> · \
                 {} · {} · {}",
                root_link(&root.name),
                e(&root.version),
                dependents(root.dependents),
                root_log(
                    root.start_log.as_deref(),
                    &format!("{} log", comparison.start)
                ),
                root_log(root.end_log.as_deref(), &format!("{} log", comparison.end)),
                name = e(&root.name),
                c = e(&root.category),
            );
            if let Some(page) = page {
                let _ = write!(
                    index,
                    " · <a href=\"{}\">diff and history</a>",
                    e(&escape_href(page))
                );
            }
            if let Some(error) = &root.first_error {
                let _ = write!(index, "\n<pre class=\"first-error\">{}</pre>", e(error));
            }
            if !root.broken.is_empty() {
                let _ = write!(
                    index,
                    "<details open><summary><span data-count=\"broken-by-{name}\">{}</span> {} \
                     failed because {} on it</summary><ol>",
                    root.broken.len(),
                    crate::plural(root.broken.len(), "crate", "crates"),
                    crate::plural(root.broken.len(), "it depends", "they depend"),
                    name = e(&root.name),
                );
                for dependent in root.broken.iter().take(SHOWN_DEPENDENTS) {
                    let _ = write!(
                        index,
                        "<li class=\"dependent\">{} {} · {} · {}",
                        root_link(&dependent.name),
                        e(&dependent.version),
                        dependents(dependent.dependents),
                        root_log(
                            dependent.end_log.as_deref(),
                            &format!("{} log", comparison.end)
                        ),
                    );
                    if let Some(page) = &dependent.page {
                        let _ = write!(
                            index,
                            " · <a href=\"{}\">diff and history</a>",
                            e(&escape_href(page))
                        );
                    }
                    index.push_str("</li>");
                }
                if root.broken.len() > SHOWN_DEPENDENTS {
                    let _ = write!(
                        index,
                        "<li>… and {} more (<a href=\"categories/regressed-1.html\">every \
                         regression</a>)</li>",
                        root.broken.len() - SHOWN_DEPENDENTS
                    );
                }
                index.push_str("</ol></details>");
            }
            index.push_str("</li>\n");
        }
        if shown {
            if group.roots.len() > SHOWN_ROOTS {
                let _ = writeln!(
                    index,
                    "<li>… and {} more crates of this cause</li>",
                    group.roots.len() - SHOWN_ROOTS
                );
            }
            index.push_str("</ol></div>\n");
        }
    }
    if report.regressions.len() > SHOWN_GROUPS {
        let _ = writeln!(
            index,
            "<p>… and {} more root causes: <a href=\"categories/regressed-1.html\">every \
             regression</a>.</p>",
            report.regressions.len() - SHOWN_GROUPS
        );
    }
    Ok(())
}

/// How many of the run's packages depend on a crate, in words.
fn dependents(count: i64) -> String {
    match count {
        0 => "no dependents in this run".to_owned(),
        1 => "<span class=\"dependents\">1</span> dependent in this run".to_owned(),
        n => format!("<span class=\"dependents\">{n}</span> dependents in this run"),
    }
}

/// A package's name linking to its page, from the report's root.
fn root_link(name: &str) -> String {
    package_link(name).replacen("href=\"../", "href=\"", 1)
}

/// A link to a log from the report's root.
fn root_log(log: Option<&str>, text: &str) -> String {
    match log {
        Some(log) => format!(
            "<a href=\"{}\">{}</a>",
            escape_html(&escape_href(log)),
            escape_html(text)
        ),
        None => format!("{} in S3", escape_html(text)),
    }
}

/// The page of one regression (under `regressed/`): its logs, the diff of its two logs around
/// its first error, the crates it broke, and its results in earlier runs.
/// `broken_by` names the regressed crate it failed because of, for a dependent.
fn regression_page(
    dir: &Path,
    report: &Report,
    cause: &str,
    root: &crate::Regression,
    broken_by: Option<&str>,
) -> String {
    let e = escape_html;
    let (start, end) = report
        .comparison
        .as_ref()
        .map_or(("start", "end"), |c| (c.start.as_str(), c.end.as_str()));
    let title = format!("{}@{}: {}", root.name, root.version, root.category);
    let mut html = head(&format!("{}: {title}", report.run.name), "../");
    let _ = writeln!(
        html,
        "<h1>{}</h1>\n<p>Root cause: {} · {} · {} · {}</p>",
        e(&title),
        match broken_by {
            Some(krate) => e(&format!(
                "dependency {krate}, which regressed itself ({cause})"
            )),
            None => e(cause),
        },
        dependents(root.dependents),
        log_link(root.start_log.as_deref(), &format!("{start} log"), ""),
        log_link(root.end_log.as_deref(), &format!("{end} log"), ""),
    );
    if let Some(rerun) = &root.end_rerun {
        let _ = writeln!(html, "<p>Run once more with {}: {}.</p>", e(end), e(rerun));
    }
    if let Some(error) = &root.first_error {
        let _ = writeln!(html, "<h2>First error</h2>\n<pre>{}</pre>", e(error));
    }
    let read = |log: &Option<String>| {
        log.as_deref()
            .and_then(|log| std::fs::read_to_string(dir.join(log)).ok())
    };
    html.push_str("<h2>What changed in the log</h2>\n");
    match (read(&root.start_log), read(&root.end_log)) {
        (Some(start_text), Some(end_text)) => {
            let diff = crate::triage::log_diff(&start_text, &end_text, root.first_error.as_deref());
            let _ = write!(
                html,
                "<p><span class=\"del\">- only in the {} log</span> · <span class=\"add\">+ only \
                 in the {} log</span></p>\n<pre class=\"diff\">",
                e(start),
                e(end)
            );
            for (tag, line) in &diff {
                let class = match tag {
                    '+' => "add",
                    '-' => "del",
                    _ => "same",
                };
                let _ = writeln!(html, "<span class=\"{class}\">{tag} {}</span>", e(line));
            }
            html.push_str("</pre>\n");
        }
        _ => html.push_str("<p>A log is in S3 only: <code>quarry-reporter explain</code>.</p>\n"),
    }
    if !root.broken.is_empty() {
        let _ = writeln!(
            html,
            "<h2>{} crates failed because they depend on it</h2>\n<table><tr><th>package</th>\
             <th>version</th><th>dependents in this run</th><th>log</th></tr>",
            root.broken.len()
        );
        for d in &root.broken {
            // A sibling page, in the same directory.
            let page = d.page.as_deref().map_or_else(String::new, |page| {
                format!(
                    " · <a href=\"{}\">diff and history</a>",
                    e(&escape_href(
                        page.strip_prefix("regressed/").unwrap_or(page)
                    ))
                )
            });
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{page}</td></tr>",
                package_link(&d.name),
                e(&d.version),
                d.dependents,
                log_link(d.end_log.as_deref(), "log", ""),
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Earlier runs</h2>\n");
    if root.history.is_empty() {
        html.push_str("<p>No earlier run tested it.</p>\n");
    } else {
        html.push_str(
            "<table id=\"history\"><tr><th>run</th><th>created</th><th>version</th><th>side</th>\
             <th>outcome</th></tr>\n",
        );
        for earlier in &root.history {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{o}\">{o}</td></tr>",
                e(&earlier.run),
                e(&earlier.created_at),
                e(&earlier.version),
                e(&earlier.side),
                o = e(&earlier.outcome),
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Comparison, Regression, RegressionGroup};

    /// What a package prints reaches the page only as text: its error, its cause.
    #[test]
    fn a_hostile_log_stays_text_on_the_first_page() {
        let dir = tempfile::tempdir().unwrap();
        let hostile = "error: <script>alert(1)</script><img src=x onerror=alert(2)>";
        let mut report = crate::tests::report_of(vec![crate::tests::failed("evil", "end")]);
        report.comparison = Some(Comparison {
            start: "start".into(),
            end: "end".into(),
            categories: [("regressed".to_owned(), 1)].into(),
            packages: Vec::new(),
        });
        report.regressions = vec![RegressionGroup {
            cause: "<b>cause</b>".into(),
            crates: 1,
            roots: vec![Regression {
                version: "1.0.0\"><script>".into(),
                first_error: Some(hostile.into()),
                page: Some("regressed/1.html".into()),
                ..crate::tests::regression("evil")
            }],
        }];
        write(dir.path(), &report).unwrap();
        for page in ["index.html", "regressed/1.html"] {
            let html = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(!html.contains("<script>alert"), "{page}: {html}");
            assert!(!html.contains("<img"), "{page}");
            assert!(!html.contains("<b>cause"), "{page}");
            assert!(
                html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{page}: {html}"
            );
        }
    }
}
