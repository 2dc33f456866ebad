//! The pages: the live view of every run and the fleet, one run's page, and what changed
//! between two runs. Rendered from PostgreSQL on each request; everything from a package or a
//! log is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use chrono::Utc;
use quarry_core::progress::{Pace, human_duration};
use quarry_infra::store::{Run, Store};

use super::{App, Failure, PACE_WINDOW, RECENT_RUNS, lookup};
use crate::compare::{Category, categorize};
use crate::{escape_href, escape_html as e};

pub(super) fn page(title: &str, refresh: bool, body: &str) -> Html<String> {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"10\">"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <link rel=\"icon\" href=\"data:,\">\
         <title>{title} · Quarry</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;}}table{{border-collapse:collapse;margin-bottom:1.5em;}}\
         td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left;}}\
         progress{{width:20em;}}.lost{{color:#a11;}}.alive{{color:#16691c;}}\
         </style></head><body>\n<p><a href=\"/\">Quarry</a></p>\n<h1>{title}</h1>\n{body}</body></html>\n",
        title = e(title),
    ))
}

pub(super) fn run_link(run: &Run) -> String {
    format!(
        "<a href=\"/runs/{}\">{}</a>",
        escape_href(&run.name),
        e(&run.name)
    )
}

pub(super) async fn index(State(app): State<Arc<App>>) -> Result<Html<String>, Failure> {
    let mut body = String::from(
        "<h2>Runs</h2>\n<table id=\"runs\"><tr><th>run</th><th>progress</th><th>done</th>\
         <th>per minute</th><th>ETA</th><th>dead-lettered</th><th>state</th></tr>\n",
    );
    let runs = app.store.runs().await?;
    for run in runs.iter().rev().take(RECENT_RUNS) {
        let figures = app.store.run_figures(run.id, PACE_WINDOW).await?;
        let pace = Pace::of(&figures);
        let known = figures.progress.total.unwrap_or(figures.progress.recorded);
        let state = if run.cancelled_at.is_some() {
            "cancelled"
        } else if figures.progress.is_complete() {
            "complete"
        } else if figures.progress.total.is_none() {
            "publishing"
        } else {
            "running"
        };
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td><progress max=\"{known}\" value=\"{done}\"></progress></td>\
             <td data-run-finished=\"{name}\">{done}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{state}</td></tr>",
            run_link(run),
            pace.per_second * 60.0,
            pace.eta_secs.map_or("–".to_owned(), human_duration),
            figures.dead_lettered,
            done = figures.progress.finished,
            name = e(&run.name),
        );
    }
    body.push_str("</table>\n");
    render_fleet(&app, &mut body).await?;
    Ok(page("Runs", true, &body))
}

pub(super) async fn render_fleet(app: &App, body: &mut String) -> anyhow::Result<()> {
    let now = Utc::now();
    let fleet = app.store.fleet(now - chrono::Duration::hours(1)).await?;
    let _ = write!(
        body,
        "<h2>Consumers</h2>\n<table id=\"fleet\"><tr><th>consumer</th><th>host</th><th>state</th>\
         <th>last heartbeat</th><th>jobs done</th><th>jobs in hand</th></tr>\n"
    );
    for member in fleet {
        let status = member.state(now);
        let in_hand: Vec<String> = member.current_jobs.iter().map(|j| j.to_string()).collect();
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"{status}\">{status}</td><td>{}s ago</td>\
             <td>{}</td><td>{}</td></tr>",
            e(&member.name),
            e(&member.host),
            (now - member.heartbeat_at).num_seconds(),
            member.jobs_done,
            e(&in_hand.join(", ")),
        );
    }
    body.push_str("</table>\n");
    Ok(())
}

pub(super) async fn run_page(
    State(app): State<Arc<App>>,
    Path(run): Path<String>,
) -> Result<Html<String>, Failure> {
    let run = lookup(&app, &run).await?;
    let figures = app.store.run_figures(run.id, PACE_WINDOW).await?;
    let pace = Pace::of(&figures);
    let progress = figures.progress;
    let mut body = format!(
        "<p>{id} · created {created}</p>\n<p><progress max=\"{known}\" value=\"{done}\"></progress> \
         <span data-count=\"finished\">{done}</span> of <span data-count=\"total\">{total}</span> jobs · \
         {rate:.1} per minute · ETA {eta} · <span data-count=\"dead-lettered\">{dead}</span> dead-lettered</p>\n",
        id = run.id,
        created = run.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        known = progress.total.unwrap_or(progress.recorded),
        done = progress.finished,
        total = progress
            .total
            .map_or_else(|| format!("{}+", progress.recorded), |t| t.to_string()),
        rate = pace.per_second * 60.0,
        eta = pace.eta_secs.map_or("–".to_owned(), human_duration),
        dead = figures.dead_lettered,
    );
    if run.cancelled_at.is_some() {
        body.push_str("<p><strong>Cancelled</strong>: its remaining jobs are skipped.</p>\n");
    }
    let report = app
        .config
        .reporter
        .output_dir
        .join(&run.name)
        .join("index.html");
    if report.is_file() {
        let _ = writeln!(
            body,
            "<p><a href=\"/reports/{}/index.html\">The written report</a></p>",
            escape_href(&run.name)
        );
    }
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    body.push_str(
        "<h2>Outcomes</h2>\n<table id=\"outcomes\"><tr><th>side</th><th>outcome</th><th>jobs</th></tr>\n",
    );
    for (side, outcome, count) in &figures.outcomes {
        *totals.entry(outcome.to_string()).or_default() += count;
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{outcome}</td><td data-count=\"{}/{outcome}\">{count}</td></tr>",
            e(side),
            e(side),
        );
    }
    for (outcome, count) in &totals {
        let _ = writeln!(
            body,
            "<tr><td>all</td><td>{outcome}</td><td data-count=\"{outcome}\">{count}</td></tr>"
        );
    }
    body.push_str("</table>\n");
    if let Some(snapshot) = app.live.get(run.id) {
        live_regressions(&mut body, &run, &snapshot);
    }
    let failures = app.store.recent_failures(run.id, 50).await?;
    body.push_str("<h2>Latest failures</h2>\n<table id=\"failures\"><tr><th>package</th><th>side</th><th>outcome</th><th>at</th><th></th></tr>\n");
    for f in &failures {
        let package = format!("{}@{}", f.crate_name, f.crate_version);
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>quarry-reporter explain {} {}</code></td></tr>",
            e(&package),
            e(&f.side),
            f.outcome,
            f.at.format("%H:%M:%S"),
            e(&run.name),
            e(&package),
        );
    }
    body.push_str("</table>\n");
    let dead = app.store.dead_letters(run.id, 50).await?;
    body.push_str("<h2>Dead-lettered</h2>\n");
    if !dead.is_empty() {
        let _ = writeln!(
            body,
            "<p>Fixed what made them fail? Requeue them: <code>quarry-producer requeue {}</code>, \
             or <code>POST /runs/{}/requeue</code> with the reporter's bearer token.</p>",
            e(&run.name),
            e(&escape_href(&run.name)),
        );
    }
    body.push_str("<table id=\"dead-letters\"><tr><th>package</th><th>side</th><th>at</th><th>reason</th></tr>\n");
    for d in &dead {
        let _ = writeln!(
            body,
            "<tr><td>{}@{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&d.crate_name),
            e(&d.crate_version),
            e(&d.side),
            d.at.format("%H:%M:%S"),
            e(d.reason.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table>\n");
    render_fleet(&app, &mut body).await?;
    Ok(page(&format!("Run {}", run.name), true, &body))
}

/// The regressions of the run's latest partial report, grouped as the report groups them.
pub(super) fn live_regressions(body: &mut String, run: &Run, snapshot: &crate::live::Snapshot) {
    if !snapshot.compared {
        return;
    }
    let _ = writeln!(
        body,
        "<h2>Regressions so far: <span data-count=\"live-regressed\">{}</span> crates, \
         <span data-count=\"live-causes\">{}</span> root causes</h2>\n<p>From the report written \
         at {} over {} of {} results: <a href=\"/reports/{}/index.html\">the {} report</a>.</p>\n<ol>",
        snapshot.regressed_crates,
        snapshot.causes,
        snapshot.at.format("%H:%M:%S UTC"),
        snapshot.finished,
        snapshot
            .total
            .map_or_else(|| "?".to_owned(), |t| t.to_string()),
        escape_href(&run.name),
        if snapshot.complete {
            "final"
        } else {
            "partial"
        },
    );
    for (n, group) in snapshot.groups.iter().enumerate() {
        let roots: Vec<String> = group
            .roots
            .iter()
            .map(|root| {
                let mut text = e(&format!("{}@{}", root.name, root.version));
                if !root.broken.is_empty() {
                    let _ = write!(text, " (and {} that depend on it)", root.broken.len());
                }
                text
            })
            .collect();
        let _ = writeln!(
            body,
            "<li><strong>{}</strong> · <span data-count=\"live-group-{}\">{}</span> crates: {}</li>",
            e(&group.cause),
            n + 1,
            group.crates,
            roots.join(", "),
        );
    }
    body.push_str("</ol>\n");
}

/// The side a run's results are compared on: its *end* side (its only one, for a one-sided
/// run).
pub(super) fn end_side(run: &Run) -> Option<String> {
    crate::side_labels(&run.definition).pop()
}

pub(super) async fn compare_page(
    State(app): State<Arc<App>>,
    Path((a, b)): Path<(String, String)>,
) -> Result<Html<String>, Failure> {
    let (a, b) = (lookup(&app, &a).await?, lookup(&app, &b).await?);
    let (Some(toolchain_a), Some(toolchain_b)) = (end_side(&a), end_side(&b)) else {
        return Err(Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a run has no toolchain".into(),
        ));
    };
    let (changes, same) = app
        .store
        .changes((a.id, &toolchain_a), (b.id, &toolchain_b))
        .await?;
    let mut body = format!(
        "<p>{} ({}) → {} ({}): <span data-count=\"changed\">{}</span> packages changed outcome, \
         <span data-count=\"same\">{same}</span> did not.</p>\n\
         <table id=\"changes\"><tr><th>package</th><th>version</th><th>{}</th><th>{}</th><th>category</th></tr>\n",
        run_link(&a),
        e(&toolchain_a),
        run_link(&b),
        e(&toolchain_b),
        changes.len(),
        e(&a.name),
        e(&b.name),
    );
    for change in &changes {
        let category = categorize(Some(change.before.into()), Some(change.after.into()), None);
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&change.crate_name),
            e(&change.crate_version),
            change.before,
            change.after,
            category.as_str(),
        );
    }
    body.push_str("</table>\n");
    // Each run's own regressions (start to end side), by package: new in b, gone since a.
    if let (Some(before), Some(after)) = (
        regressed(&app.store, &a).await?,
        regressed(&app.store, &b).await?,
    ) {
        for (heading, key, names) in [
            (
                format!("New regressions: in {}, not in {}", b.name, a.name),
                "new-regressions",
                after.difference(&before).collect::<Vec<_>>(),
            ),
            (
                format!(
                    "Gone: regressions of {} that {} does not have",
                    a.name, b.name
                ),
                "gone-regressions",
                before.difference(&after).collect::<Vec<_>>(),
            ),
        ] {
            let _ = writeln!(
                body,
                "<h2>{} (<span data-count=\"{key}\">{}</span>)</h2>\n<ul id=\"{key}\">",
                e(&heading),
                names.len()
            );
            for name in names {
                let _ = writeln!(body, "<li>{}</li>", e(name));
            }
            body.push_str("</ul>\n");
        }
    }
    Ok(page(
        &format!("{} compared with {}", a.name, b.name),
        false,
        &body,
    ))
}

/// The packages (by name) that regressed between `run`'s two sides; `None` for a run of one.
pub(super) async fn regressed(
    store: &Store,
    run: &Run,
) -> anyhow::Result<Option<std::collections::BTreeSet<String>>> {
    let [start, end] = match <[String; 2]>::try_from(crate::side_labels(&run.definition)) {
        Ok(sides) => sides,
        Err(_) => return Ok(None),
    };
    let rows = store.package_outcomes(run.id).await?;
    Ok(Some(
        quarry_core::category::package_categories(rows, &start, &end)
            .into_iter()
            .filter(|(_, category)| {
                matches!(category, Category::Regressed | Category::RegressedIce)
            })
            .map(|((name, _), _)| name)
            .collect(),
    ))
}
