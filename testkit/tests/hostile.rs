//! The trust boundary, attacked: one hostile fixture per way a package could make the consumer
//! act outside the sandbox (`testkit/fixtures/hostile/`), through the whole pipeline. Each ends
//! with the outcome and refusals of `hostile/expected.json`; a loopback listener standing in for
//! the outside world hears nothing; no marker appears on the host; `verify` is clean.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quarry_core::job::Mode;
use quarry_producer::{RunDefinition, publish_run};
use quarry_reporter::{PackageRow, Written};
use quarry_testkit::images::Images;
use quarry_testkit::{Consumers, TestStack, experiment, fixtures, packages_run};
use tokio_util::sync::CancellationToken;

/// The outside world: a listener on loopback that counts whoever connects.
struct OutsideWorld {
    addr: std::net::SocketAddr,
    /// `addr` as the fixtures name it.
    name: String,
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
            name: addr.to_string(),
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

/// Who runs the jobs: consumers in this process (sandboxed, or as an operator who turned the
/// sandbox off runs them), or consumer containers of Quarry's image.
enum Fleet {
    Sandboxed,
    Unsandboxed,
    Images(Images),
}

/// A stack whose registry holds the hostile fixtures, with the outside world they point at.
struct Hostile {
    stack: TestStack,
    outside: OutsideWorld,
    marker: tempfile::TempDir,
    /// Files of the host a fixture would have the consumer remove through a link.
    victim: tempfile::TempDir,
    /// The packed fixtures the registry serves.
    _packed: tempfile::TempDir,
}

impl Hostile {
    async fn start() -> Hostile {
        let outside = OutsideWorld::listen().await;
        let marker = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        for file in ["config.toml", "rust-toolchain"] {
            std::fs::write(victim.path().join(file), "the host's own").unwrap();
        }
        let packed = tempfile::tempdir().unwrap();
        let corpus =
            fixtures::hostile_corpus(packed.path(), &Self::fill(&outside, &marker, &victim))
                .unwrap();
        let stack = TestStack::start_with(corpus).await.unwrap();
        Hostile {
            stack,
            outside,
            marker,
            victim,
            _packed: packed,
        }
    }

    fn fill<'a>(
        outside: &'a OutsideWorld,
        marker: &'a tempfile::TempDir,
        victim: &'a tempfile::TempDir,
    ) -> fixtures::Placeholders<'a> {
        fixtures::Placeholders {
            outside: &outside.name,
            marker: marker.path(),
            victim: victim.path(),
        }
    }

    /// Runs `definition` as `run` to the end on `fleet`, checks it with `verify`, and writes its
    /// report.
    async fn run(&self, run: &str, definition: &RunDefinition, fleet: Fleet) -> Written {
        let stack = &self.stack;
        let summary = publish_run(&stack.config, run, definition, &CancellationToken::new())
            .await
            .unwrap();
        let names = [format!("{run}-a"), format!("{run}-b")];
        let names = [names[0].as_str(), names[1].as_str()];
        match fleet {
            Fleet::Sandboxed => {
                let consumers = stack.start_consumers(&names);
                stack.wait_for_run(summary.run_id).await;
                consumers.stop().await;
            }
            Fleet::Unsandboxed => {
                let mut config = stack.consumer_config(&format!("{run}-unsandboxed"));
                config.consumer.unsandboxed = true;
                let consumers = Consumers::start([config]);
                stack.wait_for_run(summary.run_id).await;
                consumers.stop().await;
            }
            Fleet::Images(images) => {
                // The directories a fixture aims at are the consumer's own host here: shown to
                // the container at their paths, as they are to an in-process consumer.
                for dir in [self.marker.path(), self.victim.path()] {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
                }
                let consumers = stack.start_image_consumers(
                    &images,
                    &names,
                    &[self.marker.path(), self.victim.path()],
                );
                stack.wait_for_run(summary.run_id).await;
                consumers.stop().unwrap();
            }
        }
        stack.assert_verified(run).await;
        quarry_reporter::generate(&stack.config, run, &stack.config.reporter.output_dir)
            .await
            .unwrap()
    }

    /// Nothing reached the outside world, nothing ran on the host, the host's files a fixture
    /// pointed a link at are still there, and nothing was written through a link in an archive
    /// (`link-in-archive`), there or anywhere in the consumers' work directory.
    fn assert_outside_untouched(&self) {
        for file in ["config.toml", "rust-toolchain"] {
            assert!(
                self.victim.path().join(file).exists(),
                "{file} removed through a link"
            );
        }
        let work = self.stack.config.consumer.work_dir.parent().unwrap();
        let planted = [
            files_named(self.victim.path(), "planted"),
            files_named(work, "planted"),
        ];
        assert!(
            planted.iter().all(Vec::is_empty),
            "written through a link in an archive: {planted:?}"
        );
        assert_eq!(
            self.outside.connections(),
            0,
            "the outside world was contacted"
        );
        let ran: Vec<_> = std::fs::read_dir(self.marker.path())
            .unwrap()
            .flatten()
            .collect();
        assert!(ran.is_empty(), "ran on the host: {ran:?}");
    }

    /// Markers the escape fixture left above its scratch directory, on this host.
    fn escape_markers(&self) -> Vec<PathBuf> {
        let work = self.stack.config.consumer.work_dir.parent().unwrap();
        files_named(work, "quarry-escape-marker")
    }
}

fn package<'a>(written: &'a Written, name: &str) -> &'a PackageRow {
    written
        .report
        .packages
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} is in the report"))
}

fn log_of(written: &Written, name: &str) -> String {
    written
        .read_log(package(written, name).log.as_deref())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_packages_are_refused_and_reach_nothing_outside_the_sandbox() {
    hostile_packages(Fleet::Sandboxed).await;
}

/// The same attacks on consumer containers of Quarry's image, run as the chart runs them: the
/// same outcomes and refusals, nothing reached (the services are on the container's loopback
/// too, with host networking), the mounted credentials unread.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the images of docker/build-local: docker/run-local runs it"]
async fn hostile_packages_are_refused_inside_the_consumer_image() {
    hostile_packages(Fleet::Images(Images::from_env())).await;
}

async fn hostile_packages(fleet: Fleet) {
    let expected: BTreeMap<String, Expected> = serde_json::from_slice(
        &std::fs::read(fixtures::dir().join("hostile/expected.json")).unwrap(),
    )
    .unwrap();
    let hostile = Hostile::start().await;
    let mut packages: Vec<&str> = expected.keys().map(String::as_str).collect();
    packages.push("quarry-fixture-sandboxed");
    let definition = packages_run(experiment(Mode::Test, 120), &packages);
    let written = hostile.run("hostile", &definition, fleet).await;

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
    assert_eq!(
        package(&written, "quarry-fixture-sandboxed").outcome,
        "test-pass",
        "no escape from any step"
    );
    hostile.assert_outside_untouched();
    // The consumers extract dependencies for every job outside the sandbox: an archive with a
    // link is not one they store (cargo, in the job's sandbox, meets it instead).
    let work = hostile.stack.config.consumer.work_dir.parent().unwrap();
    let stored = files_named(work, "Cargo.toml")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/sources/"))
        .collect::<Vec<_>>();
    assert!(
        stored
            .iter()
            .any(|p| p.to_string_lossy().contains("quarry-fixture-pass-1.0.0")),
        "the regular dependency is stored: {stored:?}"
    );
    assert!(
        !stored
            .iter()
            .any(|p| p.to_string_lossy().contains("link-in-archive")),
        "the archive with a link is stored: {stored:?}"
    );
    let above = hostile.escape_markers();
    assert!(
        above.is_empty(),
        "written above a scratch directory: {above:?}"
    );

    // What was refused, precisely, in the jobs' logs.
    let outside = hostile.outside.addr;
    for (name, line) in [
        (
            "quarry-hostile-git-dependency",
            format!(
                "quarry: refused (git-dependency): git dependency `evil` from \
                 http://{outside}/evil.git ([dependencies]): not fetched"
            ),
        ),
        (
            "quarry-hostile-git-patch",
            format!(
                "git dependency `quarry-fixture-pass` from http://{outside}/pass.git \
                 ([patch.crates-io]): not fetched"
            ),
        ),
        (
            "quarry-hostile-git-replace",
            format!(
                "git dependency `quarry-fixture-pass:1.0.0` from http://{outside}/pass.git \
                 ([replace]): not fetched"
            ),
        ),
        (
            "quarry-hostile-path-to-root",
            "path dependency `root` ([dependencies]) is \"/\", outside the package".to_owned(),
        ),
        (
            "quarry-hostile-foreign-registry",
            format!("dependency `other` from the registry sparse+http://{outside}/index/"),
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
            "quarry-hostile-config-link-above",
            "quarry: refused (override-file): src/.cargo: removed (not a directory)".to_owned(),
        ),
        (
            "quarry-hostile-config-link-above",
            "quarry: refused (override-file): rust-toolchain: removed".to_owned(),
        ),
        (
            "quarry-hostile-toolchain-file",
            "rust-toolchain.toml: removed (the run's toolchain is used)".to_owned(),
        ),
        (
            "quarry-hostile-dependency-link",
            "quarry: not stored outside the sandbox, quarry-hostile-link-in-archive@1.0.0: \
             archive entry quarry-hostile-link-in-archive-1.0.0/victim is a Symlink"
                .to_owned(),
        ),
    ] {
        let text = log_of(&written, name);
        assert!(text.contains(&line), "{name}: {line}\n{text}");
    }
    // The packages that depend on the registry resolved it through the consumer's endpoint.
    let resolved = log_of(&written, "quarry-hostile-config-credential-provider");
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
    assert_eq!(refused.get("git-dependency"), Some(&3), "{refused:?}");
    assert_eq!(refused.get("hostile-config"), Some(&13), "{refused:?}");
    assert_eq!(
        package(&written, "quarry-hostile-git-dependency")
            .cause
            .as_deref(),
        Some("broken: git-dependency")
    );
    assert_eq!(
        package(&written, "quarry-hostile-git-dependency")
            .broken_reason
            .as_deref(),
        Some("git-dependency")
    );
    let explained = quarry_reporter::explain(
        &hostile.stack.config,
        "hostile",
        "quarry-hostile-git-dependency",
    )
    .await
    .unwrap();
    assert!(
        explained.contains("→ finished as broken; refused: git-dependency"),
        "{explained}"
    );
    let html = std::fs::read_to_string(&written.html).unwrap();
    assert!(
        html.contains("<td data-refused=\"git-dependency\">3</td>"),
        "{html}"
    );
    let markdown = std::fs::read_to_string(&written.markdown).unwrap();
    assert!(
        markdown.contains("- **git-dependency** (3): "),
        "{markdown}"
    );
}

/// The same boundary for a consumer the operator runs unsandboxed: the package's code runs
/// bare (that is the operator's choice), but nothing the package ships for cargo to obey is
/// obeyed, and resolution still reaches only the registry endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn unsandboxed_resolution_keeps_the_boundary_too() {
    let hostile = Hostile::start().await;
    let definition = packages_run(
        experiment(Mode::Test, 120),
        &[
            "quarry-hostile-config-credential-provider",
            "quarry-hostile-config-proxy",
            "quarry-hostile-git-dependency",
            "quarry-fixture-sandboxed",
        ],
    );
    let written = hostile
        .run("unsandboxed", &definition, Fleet::Unsandboxed)
        .await;
    let outcome = |name: &str| package(&written, name).outcome.clone();
    assert_eq!(
        outcome("quarry-hostile-config-credential-provider"),
        "test-pass"
    );
    assert_eq!(outcome("quarry-hostile-config-proxy"), "test-pass");
    assert_eq!(outcome("quarry-hostile-git-dependency"), "broken");
    hostile.assert_outside_untouched();
    // The escape fixture is a real detector of writes above the scratch directory: bare, it
    // leaves its markers there.
    assert_eq!(outcome("quarry-fixture-sandboxed"), "build-fail");
    assert!(!hostile.escape_markers().is_empty());
}

/// A custom command sees the configuration cargo really uses: Quarry's alone, nothing of the
/// package's. If a future change let any step read a package's configuration again, cargo
/// would say so here.
#[tokio::test(flavor = "multi_thread")]
async fn cargo_reports_only_quarrys_configuration_for_a_package_that_ships_its_own() {
    let hostile = Hostile::start().await;
    let mut command = experiment(Mode::Command, 120);
    command.command = Some(
        [
            "sh",
            "-c",
            "RUSTC_BOOTSTRAP=1 cargo -Zunstable-options config get --show-origin",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    let shipping = [
        "quarry-hostile-config-credential-provider",
        "quarry-hostile-config-rustc-wrapper",
        "quarry-hostile-config-include",
    ];
    let definition = packages_run(command, &shipping);
    let written = hostile
        .run("config-get", &definition, Fleet::Sandboxed)
        .await;
    for name in shipping {
        let row = package(&written, name);
        let log = log_of(&written, name);
        assert_eq!(row.outcome, "test-pass", "{log}");
        assert_eq!(row.refused, ["override-file", "hostile-config"], "{log}");
        assert!(
            log.contains(
                "source.quarry.registry = \"sparse+http://registry.quarry.invalid/index/\""
            ),
            "{log}"
        );
        let settings: Vec<&str> = log.lines().filter(|l| l.contains(" # /")).collect();
        assert!(!settings.is_empty(), "{log}");
        for line in settings {
            assert!(
                line.ends_with("/cargo-home/config.toml"),
                "not Quarry's: {line}\n{log}"
            );
        }
    }
    hostile.assert_outside_untouched();
}

/// A patch run keeps the boundary for the patch too: an uploaded replacement with a git
/// dependency is refused before anything resolves, naming the patch.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_patch_is_refused_like_a_hostile_package() {
    let hostile = Hostile::start().await;
    let uploaded = tempfile::tempdir().unwrap();
    let crate_file = fixtures::hostile_patch(
        "pass-1.0.1",
        uploaded.path(),
        &Hostile::fill(&hostile.outside, &hostile.marker, &hostile.victim),
    )
    .unwrap();
    let patch = quarry_producer::resolve_patch(
        &hostile.stack.config,
        &format!("quarry-fixture-pass={}", crate_file.display()),
    )
    .await
    .unwrap();
    let mut definition = packages_run(
        experiment(Mode::Test, 120),
        &["quarry-hostile-config-credential-provider"],
    );
    definition.patch = Some(patch);
    let written = hostile
        .run("hostile-patch", &definition, Fleet::Sandboxed)
        .await;
    let comparison = written.report.comparison.as_ref().unwrap();
    let compared = &comparison.packages[0];
    assert_eq!(
        (compared.start.as_deref(), compared.end.as_deref()),
        (Some("test-pass"), Some("broken"))
    );
    let patched = written
        .report
        .packages
        .iter()
        .find(|p| p.outcome == "broken")
        .unwrap();
    assert!(patched.refused.contains(&"git-dependency".to_owned()));
    let log = written.read_log(patched.log.as_deref()).unwrap();
    let outside = hostile.outside.addr;
    let refusal = log
        .lines()
        .find(|l| {
            l.starts_with(
                "quarry: refused (git-dependency): the patch quarry-fixture-pass@1.0.1 (uploaded",
            )
        })
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        refusal.ends_with(&format!(
            "git dependency `evil` from http://{outside}/evil.git ([dependencies]): not fetched"
        )),
        "{log}"
    );
    hostile.assert_outside_untouched();
}
