//! Toolchain variants and lint capping, as Crater has them: `stable+rustflags=-Dwarnings` is a
//! side of its own (a new lint made an error shows as a regression against plain `stable`),
//! `--cap-lints warn` keeps lints from failing anything, even `#![deny(warnings)]` crates, and a
//! `+target=` this consumer has no standard library for ends each job as an `error` saying so.

use std::collections::BTreeMap;

use quarry_core::job::{CapLints, Mode};
use quarry_producer::publish_run;
use quarry_testkit::{TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

const PACKAGES: [&str; 2] = ["quarry-lints-denies", "quarry-lints-warns"];

#[tokio::test(flavor = "multi_thread")]
async fn variants_are_sides_of_their_own_and_capped_lints_fail_nothing() {
    let packed = tempfile::tempdir().unwrap();
    let stack = TestStack::start_with(fixtures::group("lints", packed.path()).unwrap())
        .await
        .unwrap();
    let plain = quarry_testkit::toolchain();
    let strict: quarry_core::job::Toolchain =
        format!("{plain}+rustflags=-Dwarnings").parse().unwrap();
    let never = CancellationToken::new();
    let consumers = stack.start_consumers(&["lints-a", "lints-b"]);

    // Plain against -Dwarnings: the crate that only warns regresses, the one that denies
    // warnings fails on both sides.
    let mut definition = packages_run(experiment(Mode::Check, 120), &PACKAGES);
    definition.toolchains = vec![plain.clone(), strict.clone()];
    let summary = publish_run(&stack.config, "strict", &definition, &never)
        .await
        .unwrap();
    stack.wait_for_run(summary.run_id).await;
    let categories = |written: &quarry_reporter::Written| -> BTreeMap<String, String> {
        let comparison = written.report.comparison.as_ref().expect("two sides");
        comparison
            .packages
            .iter()
            .map(|p| (p.name.clone(), p.category.clone()))
            .collect()
    };
    let written =
        quarry_reporter::generate(&stack.config, "strict", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    let comparison = written.report.comparison.as_ref().unwrap();
    assert_eq!(comparison.end, strict.to_string());
    assert_eq!(
        categories(&written),
        BTreeMap::from([
            ("quarry-lints-denies".to_owned(), "still-failing".to_owned()),
            ("quarry-lints-warns".to_owned(), "regressed".to_owned()),
        ])
    );
    let warns = comparison
        .packages
        .iter()
        .find(|p| p.name == "quarry-lints-warns")
        .unwrap();
    let end_log = written.read_log(warns.end_log.as_deref()).unwrap();
    assert!(end_log.contains("unused variable"), "{end_log}");
    assert!(end_log.contains("-D warnings"), "{end_log}");

    // The same sides with lints capped at `warn`: nothing fails.
    let mut capped = definition.clone();
    capped.experiment.cap_lints = Some(CapLints::Warn);
    let summary = publish_run(&stack.config, "capped", &capped, &never)
        .await
        .unwrap();
    stack.wait_for_run(summary.run_id).await;
    let written =
        quarry_reporter::generate(&stack.config, "capped", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    assert_eq!(
        categories(&written),
        BTreeMap::from([
            ("quarry-lints-denies".to_owned(), "still-passing".to_owned()),
            ("quarry-lints-warns".to_owned(), "still-passing".to_owned()),
        ]),
        "capped results are not the uncapped ones reused"
    );

    // A target built for explicitly works; one without its standard library here is an
    // error that names it, not a build failure of the package.
    let host: quarry_core::job::Toolchain = format!("{plain}+target=x86_64-unknown-linux-gnu")
        .parse()
        .unwrap();
    let missing: quarry_core::job::Toolchain =
        format!("{plain}+target=riscv32imc-unknown-none-elf")
            .parse()
            .unwrap();
    let mut targets = packages_run(experiment(Mode::Check, 120), &["quarry-lints-warns"]);
    targets.toolchains = vec![host.clone(), missing.clone()];
    let summary = publish_run(&stack.config, "targets", &targets, &never)
        .await
        .unwrap();
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    let written =
        quarry_reporter::generate(&stack.config, "targets", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    let outcome = |toolchain: &str| {
        written
            .report
            .packages
            .iter()
            .find(|p| p.side == toolchain)
            .unwrap_or_else(|| panic!("no result with {toolchain}"))
            .clone()
    };
    assert_eq!(outcome(host.as_str()).outcome, "build-pass");
    let error = outcome(missing.as_str());
    assert_eq!(error.outcome, "error");
    let log = written.read_log(error.log.as_deref()).unwrap();
    assert!(
        log.contains("no standard library for the target riscv32imc-unknown-none-elf"),
        "{log}"
    );
    for run in ["strict", "capped", "targets"] {
        stack.assert_verified(run).await;
    }
}
