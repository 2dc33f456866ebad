//! Real crates with real dependency trees, from the corpus `deploy/local/up` collects: build
//! scripts, proc macros, `-sys`-like crates, shipped lockfiles, dependencies down several levels.
//! Quarry itself is built from these versions with this toolchain, so each must check clean
//! through the whole pipeline (two consumers, sandboxed resolution through the registry endpoint);
//! a failure is Quarry's, and its log says why.

use quarry_core::job::Mode;
use quarry_testkit::{TestStack, experiment, packages_run, real_corpus};
use tokio_util::sync::CancellationToken;

/// Thirty-two crates of Quarry's own lock file: small leaves, crates with build scripts, proc
/// macros (and what depends on them), and trees a few levels deep.
const CRATES: [&str; 32] = [
    "anyhow",
    "base64",
    "bitflags",
    "byteorder",
    "bytes",
    "cfg-if",
    "crc32fast",
    "either",
    "flate2",
    "fnv",
    "form_urlencoded",
    "futures-util",
    "hashbrown",
    "hex",
    "http",
    "httparse",
    "indexmap",
    "itoa",
    "libc",
    "log",
    "memchr",
    "once_cell",
    "percent-encoding",
    "pin-project-lite",
    "regex",
    "ryu",
    "scopeguard",
    "semver",
    "serde_json",
    "sha2",
    "smallvec",
    "thiserror",
];

#[tokio::test(flavor = "multi_thread")]
async fn real_crates_with_their_dependency_trees_check_clean_through_the_pipeline() {
    let corpus = real_corpus().unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    // The versions the corpus was collected for (its roots), not the newest it holds: a
    // newer version may be there only as another root's dependency, without its own.
    let list = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/corpus.list"),
    )
    .unwrap();
    let roots = quarry_registry::collect::read_list(&list).unwrap();
    let packages: Vec<String> = CRATES
        .iter()
        .map(|name| {
            let root = roots
                .iter()
                .rfind(|root| root.name == *name)
                .unwrap_or_else(|| panic!("{name} is not a root of deploy/local/corpus.list"));
            root.to_string()
        })
        .collect();
    let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
    let definition = packages_run(experiment(Mode::Check, 600), &packages);
    let summary = quarry_producer::publish_run(
        &stack.config,
        "real-crates",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.jobs_queued, CRATES.len() as u64, "{summary}");
    let consumers = stack.start_consumers(&["real-1", "real-2"]);
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    let written = quarry_reporter::generate(
        &stack.config,
        "real-crates",
        &stack.config.reporter.output_dir,
    )
    .await
    .unwrap();
    let outcomes = written.outcomes();
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|(_, outcome)| **outcome != "build-pass")
        .map(|(package, outcome)| {
            // The report keeps the log of every job that did not pass.
            let logs = stack.config.reporter.output_dir.join("real-crates/logs");
            let log = std::fs::read_dir(&logs)
                .into_iter()
                .flatten()
                .flatten()
                .find(|f| {
                    let name = f.file_name().to_string_lossy().into_owned();
                    name.starts_with(&format!("{package}-"))
                        && name[package.len() + 1..].starts_with(|c: char| c.is_ascii_digit())
                })
                .and_then(|f| std::fs::read_to_string(f.path()).ok())
                .unwrap_or_default();
            format!("{package}: {outcome}\n{log}")
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    assert_eq!(outcomes.len(), CRATES.len());
    stack.assert_verified("real-crates").await;
}
