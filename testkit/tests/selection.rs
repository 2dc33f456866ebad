//! Crate selection against the real services and the test registry: the database dump as a
//! source (it must choose exactly what the registry's index and listing choose), every version,
//! name patterns, a seeded sample, reverse dependencies, and resuming a dump run.

use std::collections::{BTreeSet, HashSet};

use quarry_core::job::Mode;
use quarry_producer::selection::{Dependents, Filter, Sample};
use quarry_producer::{PublishSummary, RunDefinition, Selection, Sort, publish_run};
use quarry_registry::Corpus;
use quarry_testkit::{TestStack, experiment};
use tokio_util::sync::CancellationToken;

/// (name, version, checksum) of every job of a run.
type Chosen = BTreeSet<(String, String, String)>;

struct Setup {
    stack: TestStack,
    corpus: Corpus,
    dump: std::path::PathBuf,
}

async fn setup() -> Setup {
    let corpus = Corpus::load(&[quarry_testkit::crates_dir()])
        .unwrap()
        .closed();
    let mut stack = TestStack::start_with(corpus.clone()).await.unwrap();
    // Small pages, so that an interrupted run has more than one.
    stack.config.registry.dump_page_size = 10;
    let dump = stack.dir.path().join("db-dump.tar.gz");
    quarry_registry::dump::write_corpus_dump(&corpus, &dump, "2026-11-23T02:00:00Z").unwrap();
    Setup {
        stack,
        corpus,
        dump,
    }
}

fn index() -> Selection {
    Selection::Listing {
        sort: Sort::Alpha,
        limit: None,
    }
}

impl Setup {
    fn dump(&self) -> Selection {
        Selection::Dump {
            path: self.dump.clone(),
            sort: Sort::Alpha,
            limit: None,
        }
    }

    async fn publish(&self, name: &str, selection: Selection, filter: Filter) -> PublishSummary {
        let definition = RunDefinition {
            patch: None,
            toolchains: vec![quarry_testkit::toolchain()],
            experiment: experiment(Mode::Check, 300),
            selection,
            filter,
            toolchain_files: Vec::new(),
        };
        publish_run(
            &self.stack.config,
            name,
            &definition,
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|err| panic!("run {name}: {err:#}"))
    }

    async fn chosen(&self, run: &str) -> Chosen {
        let sql = self.stack.sql().await.unwrap();
        sql.query(
            "SELECT crate_name, crate_version, checksum FROM jobs \
             JOIN runs ON runs.id = jobs.run_id WHERE runs.name = $1",
            &[&run],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
    }

    /// Both sources with the same filter: they must choose the same packages, checksums too,
    /// and count the same crates filtered out.
    /// The (package, dependency) pairs a run recorded.
    async fn dependencies(&self, run: &str) -> BTreeSet<(String, String)> {
        let sql = self.stack.sql().await.unwrap();
        sql.query(
            "SELECT crate_name, dependency FROM dependencies \
             JOIN runs ON runs.id = dependencies.run_id WHERE runs.name = $1",
            &[&run],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
    }

    async fn both(&self, name: &str, filter: Filter) -> Chosen {
        let all_versions = filter.all_versions;
        let from_index = self
            .publish(&format!("{name}-index"), index(), filter.clone())
            .await;
        let from_dump = self
            .publish(&format!("{name}-dump"), self.dump(), filter)
            .await;
        assert_eq!(
            from_index.crates_filtered_out, from_dump.crates_filtered_out,
            "{name}: {from_index}\n{from_dump}"
        );
        let kept = self
            .chosen(&format!("{name}-index"))
            .await
            .iter()
            .map(|c| &c.0)
            .collect::<BTreeSet<_>>()
            .len();
        assert_eq!(
            from_index.crates_filtered_out as usize + from_index.packages_failed.len(),
            self.corpus.crates.len() - kept,
            "{name}: every crate is kept, filtered out, or left out with a reason"
        );
        let from_index = self.chosen(&format!("{name}-index")).await;
        let from_dump = self.chosen(&format!("{name}-dump")).await;
        assert_eq!(
            from_index, from_dump,
            "{name}: the dump and the index choose the same"
        );
        // And tell the report the same dependencies, but for every-version runs, whose dump
        // rows come before the dump's dependencies.
        if !all_versions {
            assert_eq!(
                self.dependencies(&format!("{name}-index")).await,
                self.dependencies(&format!("{name}-dump")).await,
                "{name}: the dump and the index record the same dependencies"
            );
        }
        from_index
    }

    /// The newest version of every crate whose newest version depends on `crates`.
    fn direct_dependents(&self, crates: &HashSet<String>) -> HashSet<String> {
        self.corpus
            .crates
            .iter()
            .filter(|(name, versions)| {
                !crates.contains(*name)
                    && versions.last().unwrap().entry.deps.iter().any(|d| {
                        let dependency = d.crate_name();
                        crates.contains(&dependency.to_ascii_lowercase())
                    })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

fn names(chosen: &Chosen) -> BTreeSet<String> {
    chosen.iter().map(|(name, _, _)| name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dump_chooses_what_the_index_chooses() {
    let setup = setup().await;
    let corpus = &setup.corpus;

    // The newest version of every crate, with the index's checksums.
    let newest = setup.both("newest", Filter::default()).await;
    assert_eq!(newest.len(), corpus.crates.len());
    // What the report ranks by: each newest version's normal and build dependencies.
    let expected: BTreeSet<(String, String)> = corpus
        .crates
        .iter()
        .flat_map(|(name, versions)| {
            let newest = &versions.last().unwrap().entry;
            newest
                .deps
                .iter()
                .filter(|d| d.kind.as_deref() != Some("dev"))
                .map(move |d| {
                    (
                        name.to_ascii_lowercase(),
                        d.crate_name().to_ascii_lowercase(),
                    )
                })
        })
        .collect();
    assert!(
        !expected.is_empty(),
        "the test corpus's crates have dependencies"
    );
    assert_eq!(setup.dependencies("newest-dump").await, expected);
    for (name, version, checksum) in &newest {
        let published = corpus.get(name).unwrap().last().unwrap();
        assert_eq!(
            (&published.entry.vers, &published.entry.cksum),
            (version, checksum)
        );
    }

    // Every version.
    let all = Filter {
        all_versions: true,
        ..Filter::default()
    };
    let every = setup.both("every", all).await;
    assert_eq!(every.len(), corpus.versions());
    assert!(
        every.len() > newest.len(),
        "the test corpus has crates with several versions"
    );

    // Name patterns, made from the corpus's names (it is whatever cargo's cache holds): a
    // prefix glob and one exact name spelt in capitals.
    let mut crates = corpus.crates.keys();
    let prefix: String = crates.next().unwrap().chars().take(3).collect();
    let exact = crates.last().unwrap().clone();
    let patterns = Filter {
        patterns: vec![format!("{prefix}*"), exact.to_ascii_uppercase()],
        ..Filter::default()
    };
    let matching = names(&setup.both("patterns", patterns).await);
    let expected: BTreeSet<String> = corpus
        .crates
        .keys()
        .filter(|n| n.starts_with(&prefix) || **n == exact)
        .cloned()
        .collect();
    assert!(expected.len() >= 2, "{expected:?}");
    assert!(expected.len() < corpus.crates.len());
    assert_eq!(matching, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_and_reverse_dependencies() {
    let setup = setup().await;

    // A seeded sample: the same crates from either source, other crates with another seed.
    let sample = |seed| Filter {
        sample: Some(Sample { size: 10, seed }),
        ..Filter::default()
    };
    let first = names(&setup.both("sample-1", sample(1)).await);
    assert_eq!(first.len(), 10);
    let again = names(&setup.both("sample-1-again", sample(1)).await);
    assert_eq!(first, again, "the same seed gives the same sample");
    let other = names(&setup.both("sample-2", sample(2)).await);
    assert_ne!(first, other, "another seed gives another sample");

    // Reverse dependencies, directly and two links away, of the crate of the corpus with the
    // most dependents two links away that are not direct ones.
    let two_links_of = |root: &String| {
        let direct = setup.direct_dependents(&HashSet::from([root.clone()]));
        let mut two = direct.clone();
        two.extend(setup.direct_dependents(&direct));
        two.remove(root);
        (direct, two)
    };
    let root = setup
        .corpus
        .crates
        .keys()
        .max_by_key(|root| {
            let (direct, two) = two_links_of(root);
            (two.len() - direct.len(), direct.len())
        })
        .unwrap()
        .clone();
    let (direct, two_links) = two_links_of(&root);
    assert!(
        !direct.is_empty() && two_links.len() > direct.len(),
        "{root}: {direct:?} {two_links:?}"
    );
    let dependents = |depth| Filter {
        dependents: Some(Dependents {
            name: root.clone(),
            depth,
        }),
        ..Filter::default()
    };
    let found = names(&setup.both("dependents-1", dependents(1)).await);
    assert_eq!(found, direct.iter().cloned().collect());

    let found = names(&setup.both("dependents-2", dependents(2)).await);
    assert_eq!(found, two_links.into_iter().collect());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_dump_run_resumes_without_duplicates() {
    let setup = setup().await;
    let all = Filter {
        all_versions: true,
        ..Filter::default()
    };
    let definition = RunDefinition {
        patch: None,
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Check, 300),
        selection: setup.dump(),
        filter: all.clone(),
        toolchain_files: Vec::new(),
    };
    // Interrupted from the start: the producer finishes the page in hand and stops.
    let interrupted = CancellationToken::new();
    interrupted.cancel();
    let first = publish_run(&setup.stack.config, "resumed", &definition, &interrupted)
        .await
        .unwrap();
    assert!(!first.complete);
    assert_eq!(first.pages, 1);

    let rest = setup.publish("resumed", setup.dump(), all).await;
    assert!(rest.complete && rest.resumed);
    let versions = setup.corpus.versions() as u64;
    assert_eq!(first.jobs_queued + rest.jobs_queued, versions);
    assert_eq!(rest.jobs_total, versions);
    assert_eq!(setup.chosen("resumed").await.len() as u64, versions);

    // A run continues only over the dump it started from.
    let other = setup.stack.dir.path().join("newer-dump.tar.gz");
    quarry_registry::dump::write_corpus_dump(&setup.corpus, &other, "2026-11-24T02:00:00Z")
        .unwrap();
    let definition = RunDefinition {
        patch: None,
        selection: Selection::Dump {
            path: other.clone(),
            sort: Sort::Alpha,
            limit: None,
        },
        filter: Filter {
            all_versions: true,
            ..Filter::default()
        },
        ..definition
    };
    publish_run(&setup.stack.config, "newer", &definition, &interrupted)
        .await
        .unwrap();
    // Swap the file under the run: resuming must refuse rather than skip the wrong entries.
    std::fs::copy(&setup.dump, &other).unwrap();
    let err = publish_run(
        &setup.stack.config,
        "newer",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("database dump of"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_dump_is_a_clear_error() {
    let setup = setup().await;
    let garbage = setup.stack.dir.path().join("garbage.tar.gz");
    std::fs::write(&garbage, b"this is not a gzipped tarball").unwrap();
    let definition = RunDefinition {
        patch: None,
        toolchains: vec![quarry_testkit::toolchain()],
        experiment: experiment(Mode::Check, 300),
        selection: Selection::Dump {
            path: garbage.clone(),
            sort: Sort::Alpha,
            limit: None,
        },
        filter: Filter::default(),
        toolchain_files: Vec::new(),
    };
    let err = publish_run(
        &setup.stack.config,
        "garbage",
        &definition,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("garbage.tar.gz"), "{message}");
    assert!(setup.chosen("garbage").await.is_empty(), "nothing recorded");
}
