//! Test support: a private slice of the real services for one test.
//!
//! [`TestStack::start`] gives a test its own PostgreSQL database, its own RabbitMQ vhost, its own
//! s3s-fs server (on a free port, over a temporary directory), and an in-process registry serving
//! the real `.crate` files of cargo's cache. Dropping the stack removes all of it, even when the
//! test panicked, so runs never see each other's data.
//!
//! The services must be running (`deploy/local/up` starts them). Their addresses can be changed
//! with `QUARRY_TEST_DATABASE_URL` (an admin connection), `QUARRY_TEST_AMQP_URL` (without vhost),
//! `QUARRY_TEST_RABBITMQ_API` (the management API), `QUARRY_TEST_CRATES_DIR` and
//! `QUARRY_TEST_TOOLCHAIN`.

pub mod dist_server;
pub mod fixtures;
pub mod images;
pub mod private_postgres;
pub mod private_rabbitmq;
pub mod tls;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use quarry_consumer::ConsumerStats;
use quarry_core::job::{Experiment, Mode, RunId, Toolchain};
use quarry_core::progress::Progress;
use quarry_infra::Config;
use quarry_infra::config::Secret;
use quarry_infra::store::Store;
use quarry_registry::{Corpus, RunningRegistry};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const S3_ACCESS_KEY: &str = "quarry-test";
const S3_SECRET_KEY: &str = "quarry-test-secret";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A TCP port on loopback that nothing listens on (as the kernel handed it out just now).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("loopback has a free port")
}

/// The body of a GET of `url`, as text (a page of the live view, say).
pub async fn get_text(url: impl reqwest::IntoUrl) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The crates tests use by default (`crates_dir`), with what they depend on.
pub fn local_corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::load(&[crates_dir()])?.closed())
}

/// Where a test stack's services are: the machine's (`deploy/local/up`, or the
/// `QUARRY_TEST_*` variables), or servers of a test's own (`private_postgres`,
/// `private_rabbitmq`), given explicitly rather than through the process's environment.
#[derive(Debug, Clone)]
pub struct Services {
    /// An admin connection to PostgreSQL: each stack creates its database there.
    pub database_url: String,
    /// RabbitMQ, without a vhost: each stack creates its own.
    pub amqp_url: String,
    /// RabbitMQ's management API.
    pub rabbitmq_api: String,
}

impl Services {
    /// The machine's, or where the `QUARRY_TEST_*` variables say.
    pub fn from_env() -> Services {
        Services {
            database_url: env_or(
                "QUARRY_TEST_DATABASE_URL",
                "postgres://quarry:quarry@127.0.0.1:5432/postgres",
            ),
            amqp_url: env_or("QUARRY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672"),
            rabbitmq_api: env_or("QUARRY_TEST_RABBITMQ_API", "http://127.0.0.1:15672"),
        }
    }
}

/// The toolchain tests run experiments with (the one pinned by rust-toolchain.toml).
pub fn toolchain() -> Toolchain {
    env_or("QUARRY_TEST_TOOLCHAIN", "1.95.0")
        .parse()
        .expect("QUARRY_TEST_TOOLCHAIN must be a toolchain name")
}

/// Packs the installed toolchain `name` (its sysroot, without the documentation) into `out` as
/// a gzip-compressed tar with one top directory, as one packs a toolchain directory to give a
/// run with `--toolchain-file`.
pub fn pack_installed_toolchain(name: &str, out: &Path) -> anyhow::Result<()> {
    let output = std::process::Command::new("rustc")
        .arg(format!("+{name}"))
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    anyhow::ensure!(output.status.success(), "toolchain {name} is not installed");
    let sysroot = std::fs::canonicalize(String::from_utf8(output.stdout)?.trim())?;
    let file = std::fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for dir in ["bin", "lib", "libexec", "etc"] {
        if sysroot.join(dir).is_dir() {
            tar.append_dir_all(format!("rust-{name}-packed/{dir}"), sysroot.join(dir))?;
        }
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

/// The experiment most tests run: `mode` with the given time limit, 1 GiB of memory per
/// process, earlier results reused.
pub fn experiment(mode: Mode, timeout_secs: u64) -> Experiment {
    Experiment {
        mode,
        timeout_secs,
        fresh: false,
        memory_limit_mb: 1024,
        cap_lints: None,
        command: None,
    }
}

/// A run of `mode` with the test toolchain over the first `limit` crates of the registry's
/// listing, alphabetically.
pub fn first_crates(mode: Mode, limit: u64) -> quarry_producer::RunDefinition {
    quarry_producer::RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![toolchain()],
        experiment: experiment(mode, 300),
        selection: quarry_producer::Selection::Listing {
            sort: quarry_producer::Sort::Alpha,
            limit: Some(limit),
        },
        toolchain_files: Vec::new(),
    }
}

/// A run of `experiment` with the test toolchain over every crate of the registry, in name order.
pub fn every_crate(experiment: Experiment) -> quarry_producer::RunDefinition {
    quarry_producer::RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![toolchain()],
        experiment,
        selection: quarry_producer::Selection::Listing {
            sort: quarry_producer::Sort::Alpha,
            limit: None,
        },
        toolchain_files: Vec::new(),
    }
}

/// A run of `experiment` with the test toolchain over exactly `packages` (newest versions).
pub fn packages_run(experiment: Experiment, packages: &[&str]) -> quarry_producer::RunDefinition {
    quarry_producer::RunDefinition {
        patch: None,
        filter: Default::default(),
        toolchains: vec![toolchain()],
        experiment,
        selection: quarry_producer::Selection::Packages {
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
        },
        toolchain_files: Vec::new(),
    }
}

/// The run of the dispatch benchmark and the soak: every crate of the registry, its job `true`
/// in the sandbox, nothing built.
pub fn no_op_run() -> quarry_producer::RunDefinition {
    every_crate(Experiment {
        command: Some(vec!["true".to_owned()]),
        ..experiment(Mode::Command, 60)
    })
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit is in the repository")
        .to_owned()
}

/// Runs the headless-browser checker (testkit/browser) on `pages`: (url, what to expect as its
/// README says, screenshot name under `target/test-artifacts/`, kept for looking at); panics
/// with its output when a check fails.
pub fn browser_check(pages: &[(String, serde_json::Value, &str)]) {
    let browser = repo_root().join("testkit/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "the browser checker is not installed: run deploy/local/up (it installs chromium, node \
         and testkit/browser's packages)"
    );
    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut command = std::process::Command::new("node");
    command.arg(browser.join("check.mjs"));
    let expect_dir = tempfile::tempdir().unwrap();
    for (i, (url, expect, screenshot)) in pages.iter().enumerate() {
        let expect_file = expect_dir.path().join(format!("{i}.json"));
        std::fs::write(&expect_file, expect.to_string()).unwrap();
        command
            .arg("--url")
            .arg(url)
            .arg("--expect")
            .arg(&expect_file)
            .arg("--screenshot")
            .arg(artifacts.join(screenshot));
    }
    let output = command.output().expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{text}");
    assert!(output.status.success(), "the browser check failed:\n{text}");
}

/// The real `.crate` files tests serve: cargo's download cache, cut down to the crates whose
/// dependencies it can all serve.
pub fn crates_dir() -> PathBuf {
    match std::env::var_os("QUARRY_TEST_CRATES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
            cargo_home.join("registry").join("cache")
        }
    }
}

/// The real corpus `deploy/local/up` collects (`deploy/local/corpus.list` with every crate its
/// roots need), loaded whole; an error naming the fix when it has not been collected.
pub fn real_corpus() -> anyhow::Result<Corpus> {
    Corpus::load(&[real_corpus_dir()?.join("crates")])
}

/// Where the real corpus is (its `.crate` files under `crates/`); an error naming the fix when it
/// has not been collected.
pub fn real_corpus_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("QUARRY_CORPUS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/quarry/corpus"),
    };
    anyhow::ensure!(
        dir.join("manifest.json").is_file(),
        "no real corpus in {}: run deploy/local/up, which collects it (or set QUARRY_CORPUS_DIR)",
        dir.display()
    );
    Ok(dir)
}

/// Makes sure `quarry-confine` is where an in-process consumer looks for it (one directory up
/// from a test binary), as `cargo test --workspace` leaves it: without it, slots keep no target
/// directories and the tests would not test what production runs.
fn built_confine() -> anyhow::Result<()> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            if exe
                .ancestors()
                .skip(1)
                .take(2)
                .any(|dir| dir.join("quarry-confine").is_file())
            {
                return Ok(());
            }
            // A test binary (`target/<profile>/deps/`) gets it built; anything else is told.
            let profile_dir = exe
                .parent()
                .filter(|deps| deps.ends_with("deps"))
                .and_then(Path::parent)
                .ok_or_else(|| {
                    format!("quarry-confine is not beside {}: build it", exe.display())
                })?;
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "quarry-consumer", "--bin", "quarry-confine"])
                .args(profile_dir.ends_with("release").then_some("--release"))
                .arg("--target-dir")
                .arg(profile_dir.parent().unwrap_or(profile_dir))
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("building quarry-confine failed: {status}"))
            }
        })
        .clone()
        .map_err(|why| anyhow::anyhow!(why))
}

pub struct TestStack {
    /// Configuration pointing at this stack's private database, vhost, bucket and registry.
    pub config: Config,
    pub registry: RunningRegistry,
    /// Scratch space of the test (consumer work dirs, reports); removed on drop.
    pub dir: TempDir,
    database: String,
    vhost: String,
    s3_server: Child,
    _s3_root: TempDir,
    services: Services,
}

impl TestStack {
    pub async fn start() -> anyhow::Result<TestStack> {
        TestStack::start_with(local_corpus()?).await
    }

    pub async fn start_with(corpus: Corpus) -> anyhow::Result<TestStack> {
        TestStack::start_on(corpus, Services::from_env()).await
    }

    /// A stack on `services` (a test's own servers, say) serving `corpus`.
    pub async fn start_on(corpus: Corpus, services: Services) -> anyhow::Result<TestStack> {
        built_confine()?;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("quarry_test_{id}");
        let vhost = format!("quarry-test-{id}");

        let admin = services.database_url.clone();
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .context("cannot reach PostgreSQL for tests: run deploy/local/up (or set QUARRY_TEST_DATABASE_URL)")?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .context("cannot create the test database")?;
        let mut database_url: url::Url = admin.parse()?;
        database_url.set_path(&database);

        create_vhost(&services.rabbitmq_api, &vhost).await?;
        let amqp_base = services.amqp_url.clone();

        let s3_root = tempfile::tempdir()?;
        let (s3_server, s3_addr) = start_s3s_fs(s3_root.path())?;
        let registry = quarry_registry::serve(corpus, "127.0.0.1:0".parse()?).await?;
        let dir = tempfile::tempdir()?;

        let mut config = Config::default();
        config.database.url = Secret::new(database_url.to_string());
        config.rabbitmq.url = Secret::new(format!("{}/{vhost}", amqp_base.trim_end_matches('/')));
        // Retries as in production (two delay tiers, three attempts), only sooner.
        config.rabbitmq.retry_delays_ms = vec![200, 400];
        config.s3.endpoint = Some(format!("http://{s3_addr}"));
        config.s3.bucket = format!("quarry-test-{id}");
        config.s3.access_key_id = Secret::new(S3_ACCESS_KEY);
        config.s3.secret_access_key = Secret::new(S3_SECRET_KEY);
        config.registry.index_url = registry.index_url();
        config.registry.api_url = registry.api_url();
        // The local registry needs no politeness; the test of spacing sets its own interval.
        config.registry.api_min_interval_ms = 0;
        config.consumer.work_dir = dir.path().join("consumers");
        // The producer's index cache is the test's own: registries of other tests (and runs) have
        // had this port, and their cached files would stand in when this one fails.
        config.registry.index_cache_dir = Some(dir.path().join("index-cache"));
        config.consumer.shutdown_grace_secs = 10;
        // A dead consumer's jobs come back within seconds (renewed every second meanwhile).
        config.consumer.lease_secs = 3;
        // Low enough that the fork-bomb fixture is stopped long before it counts to 3,000.
        config.consumer.task_limit = 512;
        // Toolchains the machine lacks are never downloaded from the Internet: a dist server
        // that answers nothing (the test of a mirror stands one up).
        config.consumer.toolchains.dist_server = "http://127.0.0.1:1".to_owned();
        config.reporter.output_dir = dir.path().join("reports");
        Ok(TestStack {
            config,
            registry,
            dir,
            database,
            vhost,
            s3_server,
            _s3_root: s3_root,
            services,
        })
    }

    /// The stack's configuration for a consumer named `name`.
    pub fn consumer_config(&self, name: &str) -> Config {
        let mut config = self.config.clone();
        config.consumer.name = Some(name.to_owned());
        config
    }

    /// Starts consumers named `names` in this process, sharing the stack's work directory.
    pub fn start_consumers(&self, names: &[&str]) -> Consumers {
        Consumers::start(names.iter().map(|name| self.consumer_config(name)))
    }

    /// Waits (at most a minute) until `count` consumers have joined this stack's fleet: they
    /// register once their sandbox and cgroups are set up.
    pub async fn wait_for_fleet(&self, count: usize) {
        let store = Store::connect(&self.config.database)
            .await
            .expect("the test database is reachable");
        let since = chrono::Utc::now() - chrono::Duration::minutes(1);
        tokio::time::timeout(Duration::from_secs(60), async {
            // (Until a consumer has applied the migrations, there is no fleet table.)
            while store.fleet(since).await.map_or(0, |fleet| fleet.len()) < count {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the consumers join the fleet within a minute");
    }

    /// Waits (at most 20 minutes) until every job of `run` has a result.
    pub async fn wait_for_run(&self, run: RunId) -> Progress {
        let store = Store::connect(&self.config.database)
            .await
            .expect("the test database is reachable");
        let progress = tokio::time::timeout(Duration::from_secs(20 * 60), async {
            loop {
                let progress = store
                    .progress(run)
                    .await
                    .expect("the run's progress can be read");
                if progress.is_complete() {
                    break progress;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the run finishes within 20 minutes");
        assert!(progress.is_complete(), "{progress:?}");
        progress
    }

    /// The id of the run named (or with the id) `run`.
    pub async fn run_id(&self, run: &str) -> RunId {
        let store = Store::connect(&self.config.database)
            .await
            .expect("the test database is reachable");
        store.find_run(run).await.expect("the run exists").id
    }

    /// Publishes `definition` as the run `run`, waits for it, and returns its first package's
    /// outcome and log, as the report gives them to a user.
    pub async fn run_one(
        &self,
        run: &str,
        definition: &quarry_producer::RunDefinition,
    ) -> (String, String) {
        let summary =
            quarry_producer::publish_run(&self.config, run, definition, &CancellationToken::new())
                .await
                .expect("the run is published");
        self.wait_for_run(summary.run_id).await;
        let written =
            quarry_reporter::generate(&self.config, run, &self.config.reporter.output_dir)
                .await
                .expect("the report is written");
        let row = written.report.packages[0].clone();
        let log = written
            .read_log(row.log.as_deref())
            .expect("the job's log is stored");
        (row.outcome, log)
    }

    /// Checks the invariants of the run named `run` with `quarry-reporter verify`.
    pub async fn assert_verified(&self, run: &str) {
        let verification =
            quarry_reporter::verify(&self.config, run, &self.config.reporter.output_dir)
                .await
                .expect("the run can be verified");
        assert!(verification.is_ok(), "{run}: {:?}", verification.problems);
    }

    /// Stops the stack's S3 server, as an outage would.
    pub fn stop_s3(&mut self) {
        let _ = self.s3_server.kill();
        let _ = self.s3_server.wait();
    }

    /// Closes every AMQP connection to the stack's vhost from the broker's side, as a broker
    /// restart or a network cut would. Returns how many were closed.
    pub async fn close_amqp_connections(&self) -> anyhow::Result<usize> {
        let http = reqwest::Client::new();
        let api = &self.services.rabbitmq_api;
        let connections: Vec<serde_json::Value> = http
            .get(format!("{api}/api/vhosts/{}/connections", self.vhost))
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut closed = 0;
        for connection in connections {
            let Some(name) = connection["name"].as_str() else {
                continue;
            };
            let mut url: url::Url = format!("{api}/api/connections/").parse()?;
            url.path_segments_mut()
                .map_err(|()| anyhow::anyhow!("the management API URL cannot have a path"))?
                .pop_if_empty()
                .push(name);
            http.delete(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await?
                .error_for_status()?;
            closed += 1;
        }
        Ok(closed)
    }

    /// A direct connection to the test database, for assertions the code under test cannot make.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(self.config.database.url.expose(), tokio_postgres::NoTls)
                .await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        let _ = self.s3_server.kill();
        let _ = self.s3_server.wait();
        let database = self.database.clone();
        let vhost = self.vhost.clone();
        let services = self.services.clone();
        // Drop cannot be async, and may run inside a runtime: clean up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&services.database_url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .await?;
                delete_vhost(&services.rabbitmq_api, &vhost).await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("test cleanup failed: {err:#}"),
            Err(_) => eprintln!("test cleanup panicked"),
        }
    }
}

/// Consumers running as tasks of the test process until stopped.
pub struct Consumers {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<ConsumerStats>>>,
}

impl Consumers {
    /// Starts one consumer per configuration.
    pub fn start(configs: impl IntoIterator<Item = Config>) -> Consumers {
        let shutdown = CancellationToken::new();
        let tasks = configs
            .into_iter()
            .map(|config| {
                let shutdown = shutdown.clone();
                tokio::spawn(async move { quarry_consumer::run(&config, shutdown).await })
            })
            .collect();
        Consumers { shutdown, tasks }
    }

    /// Stops them gracefully (as SIGTERM does) and adds up what they did.
    pub async fn stop(self) -> ConsumerStats {
        let mut total = ConsumerStats::default();
        for ended in self.stop_each().await {
            total += ended.expect("the consumer stops cleanly");
        }
        total
    }

    /// Stops them gracefully and says how each ended: what it did, or the error its run ended
    /// with.
    pub async fn stop_each(self) -> Vec<anyhow::Result<ConsumerStats>> {
        self.shutdown.cancel();
        let mut ended = Vec::new();
        for task in self.tasks {
            ended.push(task.await.expect("the consumer task did not panic"));
        }
        ended
    }
}

async fn create_vhost(api: &str, vhost: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    http.put(format!("{api}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("cannot create a RabbitMQ vhost through the management API: run deploy/local/up (it enables the management plugin)")?;
    http.put(format!("{api}/api/permissions/{vhost}/guest"))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("cannot grant guest access to the test vhost")?;
    Ok(())
}

async fn delete_vhost(api: &str, vhost: &str) -> anyhow::Result<()> {
    reqwest::Client::new()
        .delete(format!("{api}/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

fn s3s_fs_binary() -> PathBuf {
    let installed = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|path| path.exists());
    installed.unwrap_or_else(|| PathBuf::from("s3s-fs"))
}

/// Starts s3s-fs on a free port and waits until it accepts connections.
fn start_s3s_fs(root: &std::path::Path) -> anyhow::Result<(Child, SocketAddr)> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Command::new(s3s_fs_binary())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start s3s-fs: run deploy/local/up, which installs it")?;
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("s3s-fs exited at start: {status}");
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!("s3s-fs did not listen on {addr} within 20s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, addr))
}
