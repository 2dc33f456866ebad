//! The trust boundary, attacked: one hostile fixture per way a package could make the consumer
//! act outside the sandbox (`testkit/fixtures/hostile/`), through the whole pipeline. Each ends
//! with the outcome and refusals of `hostile/expected.json`; a loopback listener standing in for
//! the outside world hears nothing; no marker appears on the host; `verify` is clean.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quarry_producer::{RunDefinition, Selection, publish_run};
use quarry_shared::job::Mode;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures};
use tokio_util::sync::CancellationToken;

/// The outside world: a listener on loopback that counts whoever connects.
struct OutsideWorld {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl OutsideWorld {
    async fn listen() -> OutsideWorld {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let connections = connections.clone();
            async move {
                while listener.accept().await.is_ok() {
                    connections.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        OutsideWorld {
            addr,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for OutsideWorld {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, PartialEq, serde::Deserialize)]
struct Expected {
    outcome: String,
    refused: Vec<String>,
}

/// Every file named `name` under `dir`.
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(files_named(&path, name));
        } else if entry.file_name() == name {
            found.push(path);
        }
    }
    found
}

async fn run_hostile(
    sandboxed: bool,
    packages: Vec<String>,
) -> (
    TestStack,
    OutsideWorld,
    tempfile::TempDir,
    quarry_reporter::Written,
) {
    let outside = OutsideWorld::listen().await;
    let marker = tempfile::tempdir().unwrap();
    let packed = tempfile::tempdir().unwrap();
    let corpus =
        fixtures::hostile_corpus(packed.path(), &outside.addr.to_string(), marker.path()).unwrap();
    let stack = TestStack::start_with(corpus).await.unwrap();
    let definition = RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Test, 120),
        selection: Selection::Packages { packages },
    };
    let summary = publish_run(
        &stack.config,
        "hostile",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let consumers = if sandboxed {
        stack.start_consumers(&["hostile-a", "hostile-b"])
    } else {
        let mut config = stack.consumer_config("hostile-unsandboxed");
        config.consumer.unsandboxed = true;
        Consumers::start([config])
    };
    stack.wait_for_run(summary.run_id).await;
    consumers.stop().await;
    stack.assert_verified("hostile").await;
    let written =
        quarry_reporter::generate(&stack.config, "hostile", &stack.config.reporter.output_dir)
            .await
            .unwrap();
    (stack, outside, marker, written)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_packages_are_refused_and_reach_nothing_outside_the_sandbox() {
    let expected: BTreeMap<String, Expected> = serde_json::from_slice(
        &std::fs::read(fixtures::dir().join("hostile/expected.json")).unwrap(),
    )
    .unwrap();
    let mut packages: Vec<String> = expected.keys().cloned().collect();
    packages.push("quarry-fixture-sandboxed".into());
    let (stack, outside, marker, written) = run_hostile(true, packages).await;

    let found: BTreeMap<String, Expected> = written
        .report
        .packages
        .iter()
        .filter(|p| p.name.starts_with("quarry-hostile-"))
        .map(|p| {
            let found = Expected {
                outcome: p.outcome.clone(),
                refused: p.refused.clone(),
            };
            (p.name.clone(), found)
        })
        .collect();
    assert_eq!(found, expected);
    let escape = written
        .report
        .packages
        .iter()
        .find(|p| p.name == "quarry-fixture-sandboxed")
        .unwrap();
    assert_eq!(escape.outcome, "test-pass", "no escape from any step");

    // Nothing reached the outside world, nothing ran on the host, nothing was written above
    // a job's scratch directory.
    assert_eq!(outside.connections(), 0, "the outside world was contacted");
    let ran: Vec<_> = std::fs::read_dir(marker.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(ran.is_empty(), "ran on the host: {ran:?}");
    let work = stack.config.consumer.work_dir.parent().unwrap();
    let written_above = files_named(work, "quarry-escape-marker");
    assert!(written_above.is_empty(), "{written_above:?}");

    // What was refused, precisely, in the jobs' logs.
    let log = |name: &str| {
        let package = written
            .report
            .packages
            .iter()
            .find(|p| p.name == name)
            .unwrap();
        written.read_log(package.log.as_deref()).unwrap()
    };
    let outside_addr = outside.addr;
    for (package, line) in [
        (
            "quarry-hostile-git-dependency",
            format!(
                "quarry: refused (git-dependency): git dependency `evil` from \
                 http://{outside_addr}/evil.git ([dependencies]): not fetched"
            ),
        ),
        (
            "quarry-hostile-git-patch",
            format!(
                "git dependency `quarry-fixture-pass` from http://{outside_addr}/pass.git \
                 ([patch.crates-io]): not fetched"
            ),
        ),
        (
            "quarry-hostile-path-to-root",
            "path dependency `root` ([dependencies]) is \"/\", outside the package".to_owned(),
        ),
        (
            "quarry-hostile-foreign-registry",
            format!("dependency `other` from the registry sparse+http://{outside_addr}/index/"),
        ),
        (
            "quarry-hostile-config-credential-provider",
            "quarry: refused (hostile-config): \
             src/quarry-hostile-config-credential-provider-1.0.0/.cargo/config.toml set source, \
             registries, registry"
                .to_owned(),
        ),
        (
            "quarry-hostile-config-written-above",
            "quarry: refused (override-file): src/.cargo/config.toml: removed before cargo ran"
                .to_owned(),
        ),
        (
            "quarry-hostile-config-beside",
            "refused (unpack-refused): archive entry .cargo/ escapes the package directory"
                .to_owned(),
        ),
        (
            "quarry-hostile-toolchain-file",
            "rust-toolchain.toml: removed (the run's toolchain is used)".to_owned(),
        ),
    ] {
        let text = log(package);
        assert!(text.contains(&line), "{package}: {line}\n{text}");
    }
    // The packages that depend on the registry resolved it through the consumer's endpoint.
    let resolved = log("quarry-hostile-config-credential-provider");
    assert!(
        resolved.contains("Compiling quarry-fixture-pass v1.0.0"),
        "{resolved}"
    );

    // The report lists who tried what, and why the broken ones are broken.
    let refused: BTreeMap<&str, usize> = written
        .report
        .refused
        .iter()
        .map(|g| (g.refusal.as_str(), g.jobs.len()))
        .collect();
    assert_eq!(refused.get("git-dependency"), Some(&2), "{refused:?}");
    assert_eq!(refused.get("hostile-config"), Some(&13), "{refused:?}");
    let cause = |name: &str| {
        written
            .report
            .packages
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.cause.clone())
    };
    assert_eq!(
        cause("quarry-hostile-git-dependency").as_deref(),
        Some("refused: git-dependency")
    );
    let html = std::fs::read_to_string(&written.html).unwrap();
    assert!(
        html.contains("<td data-refused=\"git-dependency\">2</td>"),
        "{html}"
    );
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(
        markdown.contains("- **git-dependency** (2): "),
        "{markdown}"
    );
}

/// The same boundary for a consumer the operator runs unsandboxed: the package's code runs
/// bare (that is the operator's choice), but nothing the package ships for cargo to obey is
/// obeyed, and resolution still reaches only the registry endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn unsandboxed_resolution_keeps_the_boundary_too() {
    let packages = [
        "quarry-hostile-config-credential-provider",
        "quarry-hostile-config-proxy",
        "quarry-hostile-git-dependency",
        "quarry-fixture-sandboxed",
    ]
    .map(str::to_owned)
    .to_vec();
    let (stack, outside, marker, written) = run_hostile(false, packages).await;
    let outcome = |name: &str| {
        written
            .report
            .packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.outcome.clone())
    };
    assert_eq!(
        outcome("quarry-hostile-config-credential-provider").as_deref(),
        Some("test-pass")
    );
    assert_eq!(
        outcome("quarry-hostile-config-proxy").as_deref(),
        Some("test-pass")
    );
    assert_eq!(
        outcome("quarry-hostile-git-dependency").as_deref(),
        Some("broken")
    );
    assert_eq!(outside.connections(), 0, "the outside world was contacted");
    let ran: Vec<_> = std::fs::read_dir(marker.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(ran.is_empty(), "ran on the host: {ran:?}");
    // The escape fixture is a real detector of writes above the scratch directory: bare, it
    // leaves its markers there.
    assert_eq!(
        outcome("quarry-fixture-sandboxed").as_deref(),
        Some("build-fail")
    );
    let work = stack.config.consumer.work_dir.parent().unwrap();
    assert!(!files_named(work, "quarry-escape-marker").is_empty());
}
