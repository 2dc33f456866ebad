//! Quarry's configuration: one TOML format shared by the producer, the consumer and the reporter.
//!
//! Precedence, highest first: command-line flags, `QUARRY_*` environment variables (both read by
//! clap through [`ConfigArgs`]), the TOML file, then built-in defaults that point at the local
//! stack started by `deploy/local/up`. With no file and no overrides everything "just works"
//! against that stack.
//!
//! Values that can carry credentials are [`Secret`]s: their `Debug` output is redacted, and
//! clap is told never to print their environment values in `--help`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Ports the local stack listens on (see `deploy/local/up`).
pub const LOCAL_S3_PORT: u16 = 9014;
pub const LOCAL_REGISTRY_PORT: u16 = 9015;

/// A string that must never reach a log line, an error message or `--help`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from a file (a mounted Kubernetes Secret, say); `key` names the setting
    /// in errors, which never show the content.
    pub fn read_file(file: &Path, key: &str) -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {key} {}", file.display()))?;
        let value = text.trim_end_matches(['\n', '\r']);
        anyhow::ensure!(!value.is_empty(), "{key} {} is empty", file.display());
        Ok(Secret::new(value))
    }

    /// The secret's value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value with any password in it replaced, for URLs that are worth showing.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Replaces the password of `user:password@host` URLs with `***`; leaves other strings alone.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Cannot fail: the URL already has a password, so it has an authority.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rabbitmq: RabbitMqConfig,
    pub s3: S3Config,
    pub registry: RegistryConfig,
    pub consumer: ConsumerConfig,
    pub reporter: ReporterConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A libpq-style URL, e.g. `postgres://quarry:pw@db:5432/quarry`. With
    /// `?sslmode=require` (or `verify-ca`, `verify-full`) the connection is TLS and the server's
    /// certificate is verified; otherwise it is plain.
    pub url: Secret,
    /// A file holding the URL (a mounted secret); read at start, it replaces `url`.
    pub url_file: Option<PathBuf>,
    /// PEM certificates trusted for the server's certificate, besides the system's.
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("postgres://quarry:quarry@127.0.0.1:5432/quarry"),
            url_file: None,
            ca_file: None,
            pool_size: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// An AMQP URL including the vhost, e.g. `amqp://user:pw@mq:5672/%2f`; `amqps://` for TLS
    /// (the server's certificate is verified).
    pub url: Secret,
    /// A file holding the URL (a mounted secret); read at start, it replaces `url`.
    pub url_file: Option<PathBuf>,
    /// PEM certificates trusted for the server's certificate, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name, so several Quarry installations can share a vhost.
    pub prefix: String,
    /// How long a job that failed for infrastructure reasons waits before its next attempt, one
    /// delay queue per entry; after the last, the job is dead-lettered. Three entries mean four
    /// attempts.
    pub retry_delays_ms: Vec<u64>,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            url_file: None,
            ca_file: None,
            prefix: "quarry".to_owned(),
            retry_delays_ms: vec![10_000, 60_000],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL: s3s-fs, MinIO, ..., or for AWS itself `https://s3.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Key prefix for the `.crate` cache inside the bucket.
    pub prefix: String,
    /// Key prefix for the jobs' logs (gzip-compressed) inside the bucket.
    pub logs_prefix: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    /// Files holding the keys (mounted secrets); read at start, they replace the values above.
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
    /// PEM certificates trusted for an `https://` endpoint, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Path-style addressing, needed by most S3-compatible servers.
    pub force_path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: Some(format!("http://127.0.0.1:{LOCAL_S3_PORT}")),
            region: "us-east-1".to_owned(),
            bucket: "quarry-crates".to_owned(),
            prefix: "crates/".to_owned(),
            logs_prefix: "logs/".to_owned(),
            // The local stack's s3s-fs credentials (deploy/local/up); not valid anywhere else.
            access_key_id: Secret::new("quarry"),
            secret_access_key: Secret::new("quarry-local-secret"),
            access_key_id_file: None,
            secret_access_key_file: None,
            ca_file: None,
            force_path_style: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Sparse index root (the directory holding `config.json`), e.g. `https://index.crates.io/`.
    pub index_url: String,
    /// Web API root, e.g. `https://crates.io`.
    pub api_url: String,
    /// Sent with every request; crates.io asks crawlers to say who they are.
    pub user_agent: String,
    pub request_timeout_secs: u64,
    /// Crates asked for per page of the registry listing (crates.io allows up to 100).
    pub page_size: u32,
    /// Package versions per page read from a database dump: each page is one database
    /// transaction and one batch of publisher confirms.
    pub dump_page_size: usize,
    /// Least time between two web API requests (crates.io asks crawlers for at most one per
    /// second). The sparse index and downloads are served by a CDN and are not spaced out.
    pub api_min_interval_ms: u64,
    /// Where the producer keeps index files it read, with their `ETag`/`Last-Modified`, so a
    /// re-run asks only whether each changed [default: `$XDG_CACHE_HOME/quarry/index`, else
    /// `~/.cache/quarry/index`]. Consumers keep theirs in their work directory.
    pub index_cache_dir: Option<PathBuf>,
    /// How long an index file the registry confirmed (sent, or answered 304 for) is used
    /// without asking again. Every job resolves its dependencies afresh, so without it a fleet
    /// asks the registry for the same popular index files thousands of times a minute, and
    /// waits for each answer; crates.io's own CDN serves index files up to a minute old. 0 asks
    /// every time.
    pub index_fresh_secs: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            index_url: format!("http://127.0.0.1:{LOCAL_REGISTRY_PORT}/index/"),
            api_url: format!("http://127.0.0.1:{LOCAL_REGISTRY_PORT}"),
            user_agent: concat!(
                "quarry/",
                env!("CARGO_PKG_VERSION"),
                " (+https://github.com/quarry-rs/quarry)"
            )
            .to_owned(),
            request_timeout_secs: 30,
            api_min_interval_ms: 1000,
            page_size: 100,
            dump_page_size: 1000,
            index_cache_dir: None,
            index_fresh_secs: 60,
        }
    }
}

impl RegistryConfig {
    /// The producer's index cache directory (see `index_cache_dir`).
    pub fn producer_index_cache(&self) -> PathBuf {
        self.index_cache_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("quarry")
                .join("index")
        })
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Name shown in logs and the event log; defaults to `<hostname>-<pid>`.
    pub name: Option<String>,
    /// Where the consumer keeps its cargo home and per-job scratch directories.
    pub work_dir: PathBuf,
    /// Experiments run at once by one consumer process (its slots). It holds twice as many jobs,
    /// fetching, preparing and recording the others while these run.
    pub concurrency: u16,
    /// How long a finishing job may take after SIGTERM before it is given back to the queue.
    pub shutdown_grace_secs: u64,
    /// How long a job's lease lasts without renewal (renewed every third of it while the job is
    /// in hand): how long the jobs of a consumer that died wait before another takes them.
    pub lease_secs: u64,
    /// Bytes of experiment output kept per job; the rest is cut with a marker.
    pub log_limit_bytes: usize,
    /// Size of the local disk cache of `.crate` files (shared by the consumers of a work
    /// directory), in MiB; past it the least recently used files are removed.
    pub disk_cache_mb: u64,
    /// Processes and threads one experiment step may have at once (rustc, build scripts and
    /// tests together). Enforced where the consumer can create cgroups.
    pub task_limit: u64,
    /// Address to serve Prometheus metrics on (`/metrics`), e.g. `0.0.0.0:9100`; off if unset.
    pub metrics_listen: Option<String>,
    /// Run packages' code without the bubblewrap sandbox. Only for machines that cannot have it
    /// and run nothing else of value: the consumer warns loudly.
    pub unsandboxed: bool,
    /// Keep each job's prepared package here, as `<dir>/<job id>/<name>-<version>/` (its
    /// manifest as Quarry repaired it, the `Cargo.lock` cargo resolved; not its build), to
    /// reproduce a result by hand or check one with bare cargo. Unset, nothing is kept: kept
    /// packages are never removed by Quarry.
    pub keep_packages: Option<PathBuf>,
    /// The toolchains this consumer installs itself when a job needs one it lacks.
    pub toolchains: ToolchainsConfig,
    /// Most MiB of compiled dependencies each experiment slot keeps across its jobs (its target
    /// directories, one per toolchain), for `check`, `build` and `clippy` jobs; past it, after a
    /// job, the slot's are removed whole. 0 keeps none: every job builds its tree from nothing.
    /// Kept only in the bubblewrap sandbox, where Landlock confines build scripts and rustc.
    pub shared_target_mb: u64,
    /// Most MiB of compiled dependency units kept in the pool that every slot of every consumer
    /// on `work_dir` reuses (`<work_dir>/units`), so that a dependency compiled by one slot is
    /// not compiled again by another; past it, after a job, the least recently used are
    /// removed. 0 keeps none. Only where slots keep target directories and sources are stored.
    pub unit_pool_mb: u64,
    /// Most MiB of dependencies' sources kept extracted for every job of every consumer on
    /// `work_dir` to read (`<work_dir>/sources`), instead of each job extracting its tree again;
    /// past it, the least recently used that no job in hand reads are removed. 0 keeps none. Kept only
    /// in the bubblewrap sandbox, which shows them read-only.
    pub sources_mb: u64,
}

/// Toolchains installed on demand: a channel or date the consumer's own rustup home lacks
/// (`nightly-2026-11-30`), with rustup from `dist_server`, or a toolchain file uploaded with the
/// run. Kept in `dir` (a rustup home of their own, read-only inside the sandbox), at most
/// `limit_mb` of them: the least recently used that no job is using go first.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolchainsConfig {
    /// Where they go; `<consumer.work_dir>/toolchains` if unset. Consumers may share it (a
    /// volume): installs and removals take a lock file per toolchain there.
    pub dir: Option<PathBuf>,
    /// Where rustup downloads channels from (`RUSTUP_DIST_SERVER`): a mirror works.
    pub dist_server: String,
    /// Most MiB kept; past it the least recently used, unused ones are removed.
    pub limit_mb: u64,
    /// How long one install may take.
    pub install_timeout_secs: u64,
    /// Install toolchains the consumer lacks at all; when false, only the consumer's own
    /// rustup home is used and a job of another toolchain ends in `error`.
    pub on_demand: bool,
}

impl Default for ToolchainsConfig {
    fn default() -> Self {
        ToolchainsConfig {
            dir: None,
            dist_server: "https://static.rust-lang.org".to_owned(),
            limit_mb: 20 * 1024,
            install_timeout_secs: 1800,
            on_demand: true,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            name: None,
            work_dir: std::env::temp_dir().join("quarry-consumer"),
            concurrency: 1,
            shared_target_mb: 10 << 10,
            unit_pool_mb: 10 << 10,
            sources_mb: 10 << 10,
            shutdown_grace_secs: 30,
            lease_secs: 60,
            log_limit_bytes: 1024 * 1024,
            disk_cache_mb: 4096,
            task_limit: 4096,
            metrics_listen: None,
            unsandboxed: false,
            keep_packages: None,
            toolchains: ToolchainsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReporterConfig {
    /// Reports are written to `<output_dir>/<run name>/`.
    pub output_dir: PathBuf,
    /// Where `quarry-reporter serve` listens.
    pub listen: String,
    /// The bearer token that requests changing anything (cancelling a run, requeueing dead
    /// letters) must carry; without one, `serve` refuses them all. Prefer the environment
    /// (`QUARRY_REPORTER_TOKEN`) or a mounted file (`token_file`) to this file.
    pub token: Option<Secret>,
    /// A file holding the token (a mounted Kubernetes Secret, say); read at start.
    pub token_file: Option<PathBuf>,
    /// Whether the read-only pages are open to anyone who can reach the server; when false,
    /// they need the token too.
    pub public: bool,
    /// Runs of at most this many results get every log copied beside their report; larger
    /// ones only the logs of jobs that did not pass (the others stay in S3).
    pub copy_passing_logs_up_to: u64,
    /// Where the written reports are published (`https://quarry.example.org/reports`, as
    /// `serve` offers them under `/reports`): the markdown summary links to
    /// `<report_url>/<run>/index.html`. Unset, it names the file beside it.
    pub report_url: Option<String>,
    /// How often `serve` writes the report of each running run again, in seconds, for the live
    /// view's grouping of its regressions so far (0: never).
    pub live_report_secs: u64,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            output_dir: PathBuf::from("reports"),
            listen: "127.0.0.1:8080".to_owned(),
            token: None,
            token_file: None,
            public: true,
            copy_passing_logs_up_to: 20_000,
            report_url: None,
            live_report_secs: 300,
        }
    }
}

/// Flags (and their `QUARRY_*` environment variables) that override the configuration file.
/// Flattened into every binary's command line.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(
    next_help_heading = "Configuration (flags override QUARRY_* variables, which override the file)"
)]
pub struct ConfigArgs {
    /// TOML configuration file. Without it, `quarry.toml` in the current directory is read if it
    /// exists, else the built-in defaults for the local stack are used.
    #[arg(long, global = true, env = "QUARRY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// PostgreSQL URL [default: postgres://quarry:***@127.0.0.1:5432/quarry].
    #[arg(
        long,
        global = true,
        env = "QUARRY_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// A file holding the PostgreSQL URL (a mounted secret); replaces the URL.
    #[arg(
        long,
        global = true,
        env = "QUARRY_DATABASE_URL_FILE",
        value_name = "FILE"
    )]
    pub database_url_file: Option<PathBuf>,

    /// PEM certificates trusted for PostgreSQL's certificate, besides the system's.
    #[arg(
        long,
        global = true,
        env = "QUARRY_DATABASE_CA_FILE",
        value_name = "FILE"
    )]
    pub database_ca_file: Option<PathBuf>,

    /// RabbitMQ URL with vhost [default: amqp://guest:***@127.0.0.1:5672/%2f].
    #[arg(long, global = true, env = "QUARRY_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// A file holding the RabbitMQ URL (a mounted secret); replaces the URL.
    #[arg(long, global = true, env = "QUARRY_AMQP_URL_FILE", value_name = "FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// PEM certificates trusted for RabbitMQ's certificate, besides the system's.
    #[arg(long, global = true, env = "QUARRY_AMQP_CA_FILE", value_name = "FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Prefix of Quarry's exchange and queue names [default: quarry].
    #[arg(long, global = true, env = "QUARRY_QUEUE_PREFIX")]
    pub queue_prefix: Option<String>,

    /// S3 endpoint URL (for AWS: https://s3.<region>.amazonaws.com) [default: the local s3s-fs].
    #[arg(long, global = true, env = "QUARRY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// PEM certificates trusted for an https:// S3 endpoint, besides the system's.
    #[arg(long, global = true, env = "QUARRY_S3_CA_FILE", value_name = "FILE")]
    pub s3_ca_file: Option<PathBuf>,

    /// S3 bucket caching `.crate` files [default: quarry-crates].
    #[arg(long, global = true, env = "QUARRY_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// S3 access key id.
    #[arg(
        long,
        global = true,
        env = "QUARRY_S3_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub s3_access_key_id: Option<String>,

    /// S3 secret access key. Prefer the environment variable: flags show up in `ps`.
    #[arg(
        long,
        global = true,
        env = "QUARRY_S3_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,

    /// A file holding the S3 access key id (a mounted secret).
    #[arg(
        long,
        global = true,
        env = "QUARRY_S3_ACCESS_KEY_ID_FILE",
        value_name = "FILE"
    )]
    pub s3_access_key_id_file: Option<PathBuf>,

    /// A file holding the S3 secret access key (a mounted secret).
    #[arg(
        long,
        global = true,
        env = "QUARRY_S3_SECRET_ACCESS_KEY_FILE",
        value_name = "FILE"
    )]
    pub s3_secret_access_key_file: Option<PathBuf>,

    /// Sparse index URL of the registry [default: the local registry].
    #[arg(long, global = true, env = "QUARRY_REGISTRY_INDEX")]
    pub registry_index: Option<String>,

    /// Web API URL of the registry [default: the local registry].
    #[arg(long, global = true, env = "QUARRY_REGISTRY_API")]
    pub registry_api: Option<String>,
}

const DEFAULT_CONFIG_FILE: &str = "quarry.toml";

impl Config {
    /// Reads the file named by `args` (or `./quarry.toml` if present) and applies the overrides.
    pub fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Config::default(),
        };
        config.apply(args);
        config.read_secret_files()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        Config::from_toml(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        // toml's errors name the line and key but never echo secret values.
        Ok(toml::from_str(text)?)
    }

    fn apply(&mut self, args: &ConfigArgs) {
        let secret = |value: &Option<String>, target: &mut Secret| {
            if let Some(value) = value {
                *target = Secret::new(value.clone());
            }
        };
        let plain = |value: &Option<String>, target: &mut String| {
            if let Some(value) = value {
                target.clone_from(value);
            }
        };
        secret(&args.database_url, &mut self.database.url);
        secret(&args.amqp_url, &mut self.rabbitmq.url);
        plain(&args.queue_prefix, &mut self.rabbitmq.prefix);
        if let Some(endpoint) = &args.s3_endpoint {
            self.s3.endpoint = Some(endpoint.clone());
        }
        plain(&args.s3_bucket, &mut self.s3.bucket);
        secret(&args.s3_access_key_id, &mut self.s3.access_key_id);
        secret(&args.s3_secret_access_key, &mut self.s3.secret_access_key);
        plain(&args.registry_index, &mut self.registry.index_url);
        plain(&args.registry_api, &mut self.registry.api_url);
        let file = |value: &Option<PathBuf>, target: &mut Option<PathBuf>| {
            if value.is_some() {
                target.clone_from(value);
            }
        };
        file(&args.database_url_file, &mut self.database.url_file);
        file(&args.database_ca_file, &mut self.database.ca_file);
        file(&args.amqp_ca_file, &mut self.rabbitmq.ca_file);
        file(&args.s3_ca_file, &mut self.s3.ca_file);
        file(&args.amqp_url_file, &mut self.rabbitmq.url_file);
        file(&args.s3_access_key_id_file, &mut self.s3.access_key_id_file);
        file(
            &args.s3_secret_access_key_file,
            &mut self.s3.secret_access_key_file,
        );
    }

    /// The files secrets are read from, to keep out of packages' sight.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        [
            &self.database.url_file,
            &self.rabbitmq.url_file,
            &self.s3.access_key_id_file,
            &self.s3.secret_access_key_file,
            &self.reporter.token_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    /// Replaces each secret that has a `*_file` setting with the file's content (without its
    /// final newline). A file, when given, wins over the value however that was given.
    fn read_secret_files(&mut self) -> anyhow::Result<()> {
        let secrets = [
            (
                "database.url_file",
                &self.database.url_file,
                &mut self.database.url,
            ),
            (
                "rabbitmq.url_file",
                &self.rabbitmq.url_file,
                &mut self.rabbitmq.url,
            ),
            (
                "s3.access_key_id_file",
                &self.s3.access_key_id_file,
                &mut self.s3.access_key_id,
            ),
            (
                "s3.secret_access_key_file",
                &self.s3.secret_access_key_file,
                &mut self.s3.secret_access_key,
            ),
        ];
        for (key, file, target) in secrets {
            if let Some(file) = file {
                *target = Secret::read_file(file, key)?;
            }
        }
        if let Some(file) = &self.reporter.token_file {
            self.reporter.token = Some(Secret::read_file(file, "reporter.token_file")?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_override_defaults_and_flags_override_the_file() {
        let mut config = Config::from_toml(
            r#"
            [database]
            url = "postgres://quarry:hunter2@db/quarry"
            [s3]
            bucket = "from-file"
            "#,
        )
        .unwrap();
        assert_eq!(config.s3.bucket, "from-file");
        assert_eq!(
            config.rabbitmq.prefix, "quarry",
            "untouched sections keep defaults"
        );

        config.apply(&ConfigArgs {
            s3_bucket: Some("from-flag".into()),
            amqp_ca_file: Some("/etc/quarry-tls/ca.pem".into()),
            ..ConfigArgs::default()
        });
        assert_eq!(config.s3.bucket, "from-flag");
        assert_eq!(
            config.rabbitmq.ca_file.as_deref(),
            Some(Path::new("/etc/quarry-tls/ca.pem"))
        );
        assert_eq!(config.database.ca_file, None);
    }

    #[test]
    fn secrets_do_not_leak_through_debug_or_redaction() {
        let config = Config::from_toml(
            r#"
            [database]
            url = "postgres://quarry:hunter2@db/quarry"
            "#,
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            config.database.url.redacted_url(),
            "postgres://quarry:***@db/quarry"
        );
    }

    #[test]
    fn the_documented_example_is_valid_and_matches_the_defaults() {
        let example = Config::from_toml(include_str!("../../../docs/quarry.example.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(
            toml::to_string(&example.database).unwrap(),
            toml::to_string(&defaults.database).unwrap()
        );
        assert_eq!(
            toml::to_string(&example.s3).unwrap(),
            toml::to_string(&defaults.s3).unwrap()
        );
        assert_eq!(example.registry.index_url, defaults.registry.index_url);
        assert_eq!(example.rabbitmq.prefix, defaults.rabbitmq.prefix);
    }

    #[test]
    fn secrets_come_from_mounted_files_which_win_and_are_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let config_file = write(
            "quarry.toml",
            &format!(
                "[s3]\nsecret_access_key_file = {:?}\n[reporter]\ntoken_file = {:?}\n",
                write("s3-secret", "s3-from-file\n"),
                write("token", "token-from-file-0123456789\r\n"),
            ),
        );
        let config = Config::load(&ConfigArgs {
            config: Some(config_file.clone()),
            database_url: Some("postgres://quarry:from-flag@db/quarry".into()),
            database_url_file: Some(write("db-url", "postgres://quarry:from-file@db/quarry")),
            amqp_url_file: Some(write("amqp-url", "amqps://quarry:mq-from-file@mq/%2f\n")),
            ..ConfigArgs::default()
        })
        .unwrap();
        assert_eq!(
            config.database.url.expose(),
            "postgres://quarry:from-file@db/quarry"
        );
        assert_eq!(
            config.rabbitmq.url.expose(),
            "amqps://quarry:mq-from-file@mq/%2f"
        );
        assert_eq!(config.s3.secret_access_key.expose(), "s3-from-file");
        assert_eq!(
            config.reporter.token.as_ref().map(Secret::expose),
            Some("token-from-file-0123456789")
        );
        let shown = format!("{config:?}");
        for secret in [
            "from-file",
            "mq-from-file",
            "s3-from-file",
            "token-from-file",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }

        // A missing or empty file is an error naming the setting and the file.
        for (file, expected) in [
            (dir.path().join("absent"), "cannot read database.url_file"),
            (write("empty", "\n"), "database.url_file"),
        ] {
            let err = Config::load(&ConfigArgs {
                config: Some(config_file.clone()),
                database_url_file: Some(file.clone()),
                ..ConfigArgs::default()
            })
            .unwrap_err();
            let message = format!("{err:#}");
            assert!(message.contains(expected), "{message}");
            assert!(message.contains(&file.display().to_string()), "{message}");
        }
    }

    #[test]
    fn unknown_keys_are_an_error_naming_the_key() {
        let err = Config::from_toml("[database]\nurll = \"x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("urll"), "{err:#}");
    }
}
