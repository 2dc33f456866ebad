//! `quarry-reporter serve` against a real run: the live view and `/compare` show the database's
//! counts, `/metrics` exports what the Grafana dashboards query (every metric name in
//! `deploy/grafana/` is checked against what the binaries really export), changing state needs
//! the token, and the pages load in a real headless Chromium without errors.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use quarry_core::job::{Mode, Toolchain};
use quarry_infra::config::Secret;
use quarry_infra::store::Store;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_testkit::{Consumers, TestStack, experiment};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "a-test-token-of-some-length";

async fn run(stack: &TestStack, name: &str, toolchains: Vec<Toolchain>) -> quarry_core::job::RunId {
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains,
        experiment: experiment(Mode::Check, 300),
        selection: Selection::Listing {
            sort: Sort::Alpha,
            limit: Some(4),
        },
        toolchain_files: Vec::new(),
    };
    let summary = publish_run(&stack.config, name, &definition, &CancellationToken::new())
        .await
        .unwrap();
    stack.wait_for_run(summary.run_id).await;
    summary.run_id
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The text of the first element carrying `data-count="key"`.
fn count(html: &str, key: &str) -> Option<i64> {
    let marker = format!("data-count=\"{key}\">");
    let start = html.find(&marker)? + marker.len();
    let end = start + html[start..].find('<')?;
    html[start..end].trim().parse().ok()
}

/// Metric names a dashboard's queries use: identifiers starting with `quarry_`, and any other
/// identifier written as a selector (`name{...}`).
fn dashboard_metrics(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        for expr in exprs {
            let chars: Vec<char> = expr.chars().collect();
            let mut i = 0;
            while i < chars.len() {
                if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
                    let start = i;
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    let word: String = chars[start..i].iter().collect();
                    let in_string = chars[..start].iter().filter(|c| **c == '"').count() % 2 == 1;
                    let selector = chars.get(i) == Some(&'{');
                    if !in_string && (word.starts_with("quarry_") || selector) {
                        names.insert(word);
                    }
                } else {
                    i += 1;
                }
            }
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Names an exposition declares (`# TYPE name kind`), with the series a histogram adds.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

fn repo_root() -> PathBuf {
    quarry_testkit::repo_root()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_view_shows_the_database_and_the_dashboards_query_real_metrics() {
    let stack = TestStack::start().await.unwrap();
    let metrics_port = free_port();
    let mut consumer = stack.consumer_config("live");
    consumer.consumer.metrics_listen = Some(format!("127.0.0.1:{metrics_port}"));
    let consumers = Consumers::start([consumer]);
    let first = run(&stack, "live-a", vec![quarry_testkit::toolchain()]).await;
    // Two toolchains, so the comparison's categories are exported too.
    let second_toolchain =
        std::env::var("QUARRY_TEST_SECOND_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    run(
        &stack,
        "live-b",
        vec![
            quarry_testkit::toolchain(),
            second_toolchain.parse().unwrap(),
        ],
    )
    .await;
    let consumer_metrics =
        quarry_testkit::get_text(format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    quarry_reporter::generate(&stack.config, "live-a", &stack.config.reporter.output_dir)
        .await
        .unwrap();

    let mut config = stack.config.clone();
    config.reporter.listen = "127.0.0.1:0".to_owned();
    config.reporter.token = Some(Secret::new(TOKEN));
    let stop = CancellationToken::new();
    let (addr, server) = quarry_reporter::serve(&config, stop.clone()).await.unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let request = http.get(format!("{base}{path}"));
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.text().await.unwrap()
        }
    };

    // The live view counts what the database counts.
    let store = Store::connect(&stack.config.database).await.unwrap();
    let database = store.outcome_counts(first).await.unwrap();
    let page = get("/runs/live-a").await;
    assert_eq!(count(&page, "finished"), Some(4), "{page}");
    assert_eq!(count(&page, "total"), Some(4));
    for (outcome, n) in &database {
        assert_eq!(count(&page, outcome.as_str()), Some(*n), "{outcome}");
    }
    let index = get("/").await;
    assert!(index.contains("live-a") && index.contains("live-b"));
    assert!(
        index.contains(">live</td>"),
        "the consumer is listed: {index}"
    );

    // The same packages in both runs: each is either changed or the same.
    let compared = get("/compare/live-a/live-b").await;
    let changed = count(&compared, "changed").unwrap();
    assert_eq!(changed + count(&compared, "same").unwrap(), 4, "{compared}");
    assert_eq!(compared.matches("<tr><td>").count() as i64, changed);

    // The reporter's figures, and the dashboards ask only for what is exported.
    let reporter_metrics = get("/metrics").await;
    assert!(
        reporter_metrics.contains("quarry_run_jobs{run=\"live-a\",state=\"finished\"} 4"),
        "{reporter_metrics}"
    );
    let jobs_queue = format!("{}.jobs", stack.config.rabbitmq.prefix);
    assert!(reporter_metrics.contains(&format!(
        "quarry_queue_messages_ready{{queue=\"{jobs_queue}\"}} 0"
    )));
    assert!(reporter_metrics.contains("quarry_fleet_consumers{state=\"alive\"} 1"));
    let mut available = exported(&consumer_metrics);
    available.extend(exported(&reporter_metrics));
    available.insert("up".to_owned()); // Prometheus's own, for every target
    let queried = dashboard_metrics(&repo_root().join("deploy/grafana"));
    assert!(queried.len() > 10, "{queried:?}");
    let unknown: Vec<&String> = queried.difference(&available).collect();
    assert!(
        unknown.is_empty(),
        "dashboards query metrics no binary exports: {unknown:?}"
    );

    // The pages load in a real browser, without errors, showing the database's counts.
    let mut expected = serde_json::Map::new();
    expected.insert("finished".into(), 4.into());
    for (outcome, n) in &database {
        expected.insert(outcome.to_string(), (*n).into());
    }
    // The report's search box finds a crate from part of its name, loading its index lazily.
    let first_row = store.results(first).await.unwrap().remove(0);
    let (first_crate, first_version, first_outcome) = (
        first_row.crate_name,
        first_row.crate_version,
        first_row.outcome.to_string(),
    );
    let report_counts: serde_json::Map<String, serde_json::Value> = database
        .iter()
        .map(|(o, n)| (o.to_string(), (*n).into()))
        .collect();
    quarry_testkit::browser_check(&[
        (
            format!("{base}/runs/live-a"),
            serde_json::json!({ "counts": expected, "texts": ["Latest failures"] }),
            "live-view.png",
        ),
        (
            format!("{base}/reports/live-a/index.html"),
            serde_json::json!({
                "counts": report_counts,
                "search": { "query": &first_crate[1..], "finds": &first_crate },
            }),
            "report.png",
        ),
        (
            format!("{base}/reports/live-a/package.html#{first_crate}"),
            serde_json::json!({ "texts": [&first_version, &first_outcome] }),
            "report-package.png",
        ),
        (
            format!("{base}/reports/live-a/packages/all-1.html"),
            serde_json::json!({ "texts": [&first_crate, "rows 1–4 of 4"] }),
            "report-packages.png",
        ),
    ]);

    // The endpoint the Kubernetes probes ask.
    assert_eq!(get("/healthz").await, "ok\n");

    // Changing state needs the token.
    let cancel = format!("{base}/runs/live-b/cancel");
    let refused = http.post(&cancel).send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let wrong = http
        .post(&cancel)
        .bearer_auth("a-test-token-of-some-lengtH")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(!cancelled(&store, "live-b").await);
    let accepted = http.post(&cancel).bearer_auth(TOKEN).send().await.unwrap();
    assert!(accepted.status().is_success(), "{}", accepted.status());
    assert!(cancelled(&store, "live-b").await);

    stop.cancel();
    server.await.unwrap();
    consumers.stop().await;
}

/// Whether the run named `run` is cancelled, as the database says.
async fn cancelled(store: &Store, run: &str) -> bool {
    store.find_run(run).await.unwrap().cancelled_at.is_some()
}
