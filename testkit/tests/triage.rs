//! The report a triager reads: a library that stops compiling on the end toolchain and the
//! crates that fail because they depend on it read as one root cause, its dependents under it,
//! the most depended on first; a crate that regresses on its own is a cause of its own. Checked
//! in `report.json`, `summary.md`, each regression's page (the diff of its logs, its history)
//! and in a real headless browser, whose screenshot is kept under `target/test-artifacts/`.

use quarry_core::job::Mode;
use quarry_producer::{RunDefinition, Selection, Sort, publish_run};
use quarry_testkit::{TestStack, experiment, fixtures};
use tokio_util::sync::CancellationToken;

fn definition(selection: Selection) -> RunDefinition {
    let end = std::env::var("QUARRY_TEST_SECOND_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain(), end.parse().unwrap()],
        experiment: experiment(Mode::Check, 120),
        selection,
        toolchain_files: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_library_and_its_dependents_read_as_one_root_cause() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::group("triage", packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let never = CancellationToken::new();
    // The live view, writing partial reports every second as results arrive.
    let mut config = stack.config.clone();
    config.reporter.listen = "127.0.0.1:0".to_owned();
    config.reporter.live_report_secs = 1;
    let stop = CancellationToken::new();
    let (addr, server) = quarry_reporter::serve(&config, stop.clone()).await.unwrap();
    let listing = Selection::Listing {
        sort: Sort::Alpha,
        limit: None,
    };
    let summary = publish_run(&stack.config, "triage", &definition(listing), &never)
        .await
        .unwrap();
    assert_eq!(summary.jobs_queued, 12, "{summary}");
    let consumers = stack.start_consumers(&["triage-a", "triage-b"]);
    stack.wait_for_run(summary.run_id).await;

    // A second run of the library alone: its report shows the first run as history.
    let again = Selection::Packages {
        packages: vec!["quarry-triage-core".into()],
    };
    let summary = publish_run(&stack.config, "triage-again", &definition(again), &never)
        .await
        .unwrap();
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    // The live view's last partial report of the run, once it is done; then the live view
    // stops, before the test writes the same files itself. Until that last one is written the
    // report on disk may be the one from a result before the last, which `verify` rightly
    // calls out of date.
    let run_page = final_live_report(&format!("http://{addr}/runs/triage")).await;
    stack.assert_verified("triage").await;
    assert!(
        run_page.contains("<span data-count=\"live-group-1\">5</span>"),
        "{run_page}"
    );
    quarry_testkit::browser_check(&[(
        format!("http://{addr}/runs/triage"),
        serde_json::json!({
            "counts": { "live-regressed": 6, "live-causes": 2, "live-group-1": 5, "live-group-2": 1 },
            "texts": ["quarry-triage-core@1.0.0 (and 4 that depend on it)", "the final report"],
        }),
        "triage-live.png",
    )]);
    stop.cancel();
    server.await.unwrap();

    let out = &stack.config.reporter.output_dir;
    let written = quarry_reporter::generate(&stack.config, "triage", out)
        .await
        .unwrap();
    let groups = &written.report.regressions;
    let causes: Vec<(&str, usize)> = groups
        .iter()
        .map(|g| (g.cause.as_str(), g.crates))
        .collect();
    assert_eq!(
        causes,
        [
            ("E0308: mismatched types", 5),
            ("E0425: cannot find value `missing_value` in this scope", 1)
        ],
        "{groups:#?}"
    );
    let core = &groups[0].roots[0];
    assert_eq!(core.name, "quarry-triage-core");
    assert_eq!(core.dependents, 2, "mid and app depend on it");
    let broken: Vec<(&str, i64)> = core
        .broken
        .iter()
        .map(|d| (d.name.as_str(), d.dependents))
        .collect();
    assert_eq!(
        broken,
        [
            ("quarry-triage-mid", 2),
            ("quarry-triage-app", 0),
            ("quarry-triage-leaf-a", 0),
            ("quarry-triage-leaf-b", 0),
        ]
    );
    let first_error = core.first_error.as_deref().unwrap();
    assert!(
        first_error.starts_with("error[E0308]: mismatched types"),
        "{first_error}"
    );
    assert!(first_error.contains("src/lib.rs"), "{first_error}");

    // Re-running exactly the regressed crates: the command is on the page, and it takes them.
    let command = &written.report.reruns["regressed"];
    assert!(
        command.starts_with(
            "quarry-producer run --name triage-regressed --from-run triage --only regressed"
        ) && command.ends_with("--fresh"),
        "{command}"
    );
    let regressed = quarry_producer::packages_from_run(
        &stack.config,
        "triage",
        &[quarry_producer::Only::Regressed],
    )
    .await
    .unwrap();
    assert_eq!(regressed.len(), 6, "{regressed:?}");

    // The library's page: what changed between its two logs, around the first error.
    let page = std::fs::read_to_string(written.dir.join(core.page.as_deref().unwrap())).unwrap();
    assert!(
        page.contains("<span class=\"add\">+ error[E0308]: mismatched types</span>"),
        "{page}"
    );
    assert!(page.contains("No earlier run tested it."), "{page}");
    // A dependent's page too: what it failed because of, and its own log's changes.
    let mid = &core.broken[0];
    let page = std::fs::read_to_string(written.dir.join(mid.page.as_deref().unwrap())).unwrap();
    assert!(
        page.contains(
            "dependency quarry-triage-core, which regressed itself (E0308: mismatched types)"
        ),
        "{page}"
    );
    assert!(
        page.contains("+ error: could not compile `quarry-triage-core`"),
        "{page}"
    );

    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(
        markdown.contains("#### 1. `E0308: mismatched types` (5 crates)"),
        "{markdown}"
    );
    assert!(
        markdown.contains(
            "- `quarry-triage-core@1.0.0`: build-pass → build-fail, 2 dependents in this run: \
             `error[E0308]: mismatched types`; broke 4 that depend on it: `quarry-triage-mid`, \
             `quarry-triage-app`, `quarry-triage-leaf-a`, `quarry-triage-leaf-b`"
        ),
        "{markdown}"
    );
    assert!(markdown.contains(command.as_str()), "{markdown}");

    // The later run's report: the library's history is the first run's two results.
    let later = quarry_reporter::generate(&stack.config, "triage-again", out)
        .await
        .unwrap();
    let history = &later.report.regressions[0].roots[0].history;
    let seen: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|h| (h.run.as_str(), h.side.as_str(), h.outcome.as_str()))
        .collect();
    let end = &written.report.comparison.as_ref().unwrap().end;
    assert_eq!(
        seen,
        [
            (
                "triage",
                quarry_testkit::toolchain().to_string().as_str(),
                "build-pass"
            ),
            ("triage", end.as_str(), "build-fail"),
            ("triage", format!("{end} (re-run)").as_str(), "build-fail"),
        ],
        "{history:#?}"
    );

    // In a browser: the group, its count, its root and the dependents in their order.
    config.reporter.live_report_secs = 0;
    let stop = CancellationToken::new();
    let (addr, server) = quarry_reporter::serve(&config, stop.clone()).await.unwrap();
    // Between the two runs: the later one lacks the dependents, so their regressions are gone.
    let compare =
        quarry_testkit::get_text(format!("http://{addr}/compare/triage/triage-again")).await;
    assert!(
        compare.contains("<span data-count=\"gone-regressions\">5</span>")
            && compare.contains("<span data-count=\"new-regressions\">0</span>")
            && compare.contains("<li>quarry-triage-mid</li>"),
        "{compare}"
    );

    let index = format!("http://{addr}/reports/triage/index.html");
    quarry_testkit::browser_check(&[
        (
            index,
            serde_json::json!({
                "counts": {
                    "regressed-crates": 6,
                    "root-causes": 2,
                    "group-1": 5,
                    "group-2": 1,
                    "broken-by-quarry-triage-core": 4,
                },
                "texts": ["E0308: mismatched types · 5 crates", "4 crates failed because they depend on it"],
                "order": [
                    "Regressions",
                    "E0308: mismatched types",
                    "quarry-triage-core",
                    "2 dependents in this run",
                    "error[E0308]: mismatched types",
                    "quarry-triage-mid",
                    "quarry-triage-app",
                    "quarry-triage-leaf-a",
                    "quarry-triage-leaf-b",
                    "E0425",
                    "quarry-triage-own",
                    "Outcomes",
                ],
            }),
            "triage-report.png",
        ),
        (
            format!(
                "http://{addr}/reports/triage/{}",
                core.page.as_deref().unwrap()
            ),
            serde_json::json!({
                "texts": ["+ error[E0308]: mismatched types", "4 crates failed because they depend on it"],
            }),
            "triage-regression.png",
        ),
        (
            format!(
                "http://{addr}/reports/triage-again/{}",
                later.report.regressions[0].roots[0]
                    .page
                    .as_deref()
                    .unwrap()
            ),
            serde_json::json!({ "texts": ["Earlier runs", "triage"] }),
            "triage-history.png",
        ),
    ]);
    stop.cancel();
    server.await.unwrap();
}

/// The run page once the live view has written the run's final report.
async fn final_live_report(url: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let page = reqwest::get(url).await.unwrap().text().await.unwrap();
        if page.contains("the final report") {
            return page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no final partial report after 60 s:\n{page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
