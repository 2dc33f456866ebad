//! Preparing published packages as Crater's rustwide does, end to end: one fixture crate per
//! rule Quarry applies before resolving (targets the package excludes, a parent workspace, an
//! obsolete cargo feature, a shipped lockfile kept, invalid or stale), each change said in the
//! job's log, and one per reason a package can be broken for, stored on its result and counted
//! in the report (`testkit/fixtures/prepare/expected.json`).

use std::collections::BTreeMap;

use quarry_core::job::Mode;
use quarry_producer::publish_run;
use quarry_testkit::{TestStack, experiment, fixtures};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
struct Expected {
    outcome: String,
    #[serde(default)]
    broken_reason: Option<String>,
    /// Lines the job's log must hold.
    #[serde(default)]
    log: Vec<String>,
    /// What the job's log must not mention at all.
    #[serde(default)]
    quiet: Option<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn each_preparation_rule_and_broken_reason_is_applied_said_and_counted() {
    let packed = tempfile::tempdir().unwrap();
    let corpus = fixtures::prepare_corpus(packed.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let expected: BTreeMap<String, Expected> = serde_json::from_slice(
        &std::fs::read(fixtures::dir().join("prepare/expected.json")).unwrap(),
    )
    .unwrap();
    let definition = quarry_testkit::every_crate(experiment(Mode::Check, 120));
    let never = CancellationToken::new();
    let summary = publish_run(&stack.config, "prepare", &definition, &never)
        .await
        .unwrap();
    let consumers = stack.start_consumers(&["prepare-a", "prepare-b"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;

    let written =
        quarry_reporter::generate(&stack.config, "prepare", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    // The yanked version is not a job of its own: the producer takes no yanked version.
    let outcomes: BTreeMap<&str, &str> = written.outcomes();
    let wanted: BTreeMap<&str, &str> = expected
        .iter()
        .map(|(name, e)| (name.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, wanted);
    for (name, expected) in &expected {
        let package = written
            .report
            .packages
            .iter()
            .find(|p| &p.name == name)
            .unwrap();
        let log = written.read_log(package.log.as_deref()).unwrap_or_default();
        assert_eq!(
            package.broken_reason, expected.broken_reason,
            "{name}\n---\n{log}"
        );
        for line in &expected.log {
            assert!(log.contains(line.as_str()), "{name}: {line}\n---\n{log}");
        }
        if let Some(quiet) = &expected.quiet {
            assert!(!log.contains(quiet.as_str()), "{name}: {quiet}\n---\n{log}");
        }
    }

    // Counted in the report, by reason, in every form of it.
    let broken: BTreeMap<&str, usize> = written
        .report
        .broken
        .iter()
        .map(|g| (g.reason.as_str(), g.jobs.len()))
        .collect();
    let mut reasons = BTreeMap::new();
    for reason in expected.values().filter_map(|e| e.broken_reason.as_deref()) {
        *reasons.entry(reason).or_insert(0) += 1;
    }
    assert_eq!(broken, reasons);
    let html = std::fs::read_to_string(&written.html).unwrap();
    assert!(
        html.contains("<td data-broken=\"yanked-dependencies\">1</td>"),
        "{html}"
    );
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(markdown.contains("| invalid-manifest | 1 |"), "{markdown}");
    let csv = std::fs::read_to_string(&written.csv).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.starts_with("quarry-prepare-missing-dependency,")
                && l.contains(",missing-dependencies,")),
        "{csv}"
    );
    stack.assert_verified("prepare").await;
}
