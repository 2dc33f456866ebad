//! Quarry's images, run the way the Helm chart runs its pods: the producer and the reporter as
//! one-off containers, consumers as long-lived ones, all with podman on the host's network
//! against a [`TestStack`]'s services. Tests that use this are `#[ignore]`d (they need the
//! images `docker/build-local` makes); `docker/run-local` runs them.
//!
//! What the chart gives a pod, each container gets here too (the consumer's in `userns` mode,
//! docs/operations.md "The sandbox"):
//! - its own user namespace (`hostUsers: false`): container UIDs 0..65536 are host UIDs from
//!   [`HOST_UID_BASE`] on, so the image's UID 10001 is nobody on the host;
//! - UID and GID 10001, every capability dropped, no privilege escalation, a read-only root and
//!   a 1 GiB tmpfs at `/tmp`;
//! - consumers: seccomp and AppArmor unconfined and an unmasked `/proc` (`procMount: Unmasked`),
//!   an init process as PID 1 reaping orphans (the pod's pause process), the work volume at
//!   `/var/lib/quarry/work`;
//! - the configuration file at `/etc/quarry/quarry.toml`, read-only, without secrets; the
//!   secrets as files under `/run/secrets/quarry`, read-only, named by `QUARRY_*_FILE`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use quarry_infra::Config;
use quarry_infra::config::Secret;
use tempfile::TempDir;

use crate::TestStack;

/// Where the containers' UID 0 is on the host; the image's user 10001 is this plus 10001.
pub const HOST_UID_BASE: u32 = 200_000;
/// The images' user (docker/*.Dockerfile) and the chart's `runAsUser` (helm/validate reads it).
const IMAGE_UID: u32 = 10001;
/// Where the chart mounts the configuration file (helm/validate reads these paths).
const CONFIG_FILE: &str = "/etc/quarry/quarry.toml";
/// Where the chart mounts the credentials Secret (helm/validate reads these paths).
const SECRETS_DIR: &str = "/run/secrets/quarry";
/// The chart's consumer work volume.
const WORK_DIR: &str = "/var/lib/quarry/work";

/// The host UID (and GID) of the images' user.
pub fn host_uid() -> u32 {
    HOST_UID_BASE + IMAGE_UID
}

/// The three images of one tag, `localhost/quarry-{producer,consumer,reporter}:TAG`
/// (`QUARRY_TEST_IMAGE_TAG`, default `local`, as `docker/build-local` tags them).
#[derive(Debug, Clone)]
pub struct Images {
    tag: String,
}

impl Images {
    /// The images named by `QUARRY_TEST_IMAGE_TAG`; a panic naming the fix if one is missing.
    pub fn from_env() -> Images {
        let images = Images {
            tag: crate::env_or("QUARRY_TEST_IMAGE_TAG", "local"),
        };
        for component in ["producer", "consumer", "reporter"] {
            let image = images.image(component);
            let exists = podman()
                .args(["image", "exists", &image])
                .status()
                .is_ok_and(|status| status.success());
            assert!(exists, "no image {image}: run docker/build-local first");
        }
        images
    }

    pub fn image(&self, component: &str) -> String {
        format!("localhost/quarry-{component}:{}", self.tag)
    }
}

/// podman as this host needs it: crun refuses the host's hybrid cgroups (docs/operations.md).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "/usr/sbin/runc"]);
    command
}

/// Gives `path` (and everything under it) to the images' user as the host sees it.
fn give_to_image_user(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{0}:{0}", host_uid()))
        .arg(path)
        .status()
        .context("cannot run chown")?;
    anyhow::ensure!(status.success(), "chown {} failed", path.display());
    Ok(())
}

/// The configuration file and secret files of a container, as the chart's ConfigMap and
/// Secret volumes hold them.
struct Mounted {
    dir: TempDir,
}

impl Mounted {
    /// `config` with its secrets taken out into files, and the file settings pointing at them.
    fn new(config: &Config) -> anyhow::Result<Mounted> {
        let dir = tempfile::tempdir()?;
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets)?;
        let mut config = config.clone();
        let files = [
            ("database-url", &mut config.database.url),
            ("amqp-url", &mut config.rabbitmq.url),
            ("s3-access-key-id", &mut config.s3.access_key_id),
            ("s3-secret-access-key", &mut config.s3.secret_access_key),
        ];
        for (name, secret) in files {
            let file = secrets.join(name);
            std::fs::write(&file, secret.expose())?;
            // The chart's Secret volume: readable by the pod's group only.
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o440))?;
            *secret = Secret::new("");
        }
        // The environment's *_FILE variables name them, as in the chart.
        config.database.url_file = None;
        config.rabbitmq.url_file = None;
        config.s3.access_key_id_file = None;
        config.s3.secret_access_key_file = None;
        let text = toml::to_string(&config).context("cannot write the configuration")?;
        std::fs::write(dir.path().join("quarry.toml"), text)?;
        give_to_image_user(dir.path())?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Mounted { dir })
    }

    /// podman arguments mounting them where the chart does, and the variables naming them.
    fn args(&self) -> Vec<String> {
        let dir = self.dir.path().display();
        let mut args = vec![
            "-v".to_owned(),
            format!("{dir}/quarry.toml:{CONFIG_FILE}:ro"),
            "-v".to_owned(),
            format!("{dir}/secrets:{SECRETS_DIR}:ro"),
            "-e".to_owned(),
            format!("QUARRY_CONFIG={CONFIG_FILE}"),
        ];
        for (variable, file) in [
            ("QUARRY_DATABASE_URL_FILE", "database-url"),
            ("QUARRY_AMQP_URL_FILE", "amqp-url"),
            ("QUARRY_S3_ACCESS_KEY_ID_FILE", "s3-access-key-id"),
            ("QUARRY_S3_SECRET_ACCESS_KEY_FILE", "s3-secret-access-key"),
        ] {
            args.push("-e".to_owned());
            args.push(format!("{variable}={SECRETS_DIR}/{file}"));
        }
        args
    }
}

/// The settings every component's container gets from the chart (pod and container
/// `securityContext`, the `/tmp` emptyDir).
fn restricted() -> Vec<String> {
    [
        "--network=host",
        &format!("--uidmap=0:{HOST_UID_BASE}:65536"),
        &format!("--gidmap=0:{HOST_UID_BASE}:65536"),
        &format!("--user={IMAGE_UID}:{IMAGE_UID}"),
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--read-only",
        // Kubernetes adds no tmpfs of its own to a read-only root; the chart mounts /tmp.
        "--read-only-tmpfs=false",
        "--tmpfs=/tmp:rw,size=1g,mode=1777",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The consumer container's additions in the chart's `userns` sandbox mode.
fn sandbox_mode_userns() -> Vec<String> {
    [
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--security-opt=unmask=ALL",
        "--init",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What a one-off container printed (stdout, then stderr), or an error with it if it failed.
pub fn check(output: Output, what: &str) -> anyhow::Result<String> {
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{what} failed ({}):\n{printed}", output.status);
    }
    Ok(printed)
}

impl TestStack {
    /// The stack's configuration as a container reads it: the stack's scratch directory is
    /// mounted at the same path, so its reports and caches are where the tests look.
    fn container_config(&self) -> Config {
        let mut config = self.config.clone();
        config.consumer.work_dir = PathBuf::from(WORK_DIR);
        config.consumer.name = None;
        config
    }

    /// Runs `component`'s image once with `args` (as the chart's Jobs run the producer), the
    /// stack's scratch directory mounted at its own path; what it printed on stdout.
    pub fn run_image(&self, images: &Images, component: &str, args: &[&str]) -> Output {
        let mounted = Mounted::new(&self.container_config()).expect("the config can be mounted");
        give_to_image_user(self.dir.path()).expect("the scratch directory can be handed over");
        let dir = self.dir.path().display();
        let output = podman()
            .args(["run", "--rm"])
            .args(restricted())
            .args(mounted.args())
            .arg(format!("-v={dir}:{dir}"))
            .arg(images.image(component))
            .args(args)
            .output()
            .expect("podman runs");
        drop(mounted);
        output
    }

    /// Starts consumer containers named `names` from `images`, as the chart's Deployment runs
    /// them (sandbox mode `userns`), sharing the stack's consumer work directory as their work
    /// volume; `extra` host directories are mounted at their own paths. Returns once each
    /// answers on `/metrics` (the chart's startup probe).
    pub fn start_image_consumers(
        &self,
        images: &Images,
        names: &[&str],
        extra: &[&Path],
    ) -> ImageConsumers {
        let work = &self.config.consumer.work_dir;
        std::fs::create_dir_all(work).expect("the work directory can be made");
        give_to_image_user(work).expect("the work directory can be handed over");
        let mounted = Mounted::new(&self.container_config()).expect("the config can be mounted");
        let mut consumers = ImageConsumers {
            containers: Vec::new(),
            started_in: Vec::new(),
            _mounted: mounted,
        };
        for name in names {
            let container = format!("quarry-test-{}", uuid::Uuid::new_v4().simple());
            let port = crate::free_port();
            let mut command = podman();
            command
                .args(["run", "-d", "--name", &container])
                .args(restricted())
                .args(sandbox_mode_userns())
                .args(consumers._mounted.args())
                .arg(format!("-v={}:{WORK_DIR}", work.display()))
                .arg(format!("-e=QUARRY_CONSUMER_NAME={name}"))
                .arg(format!("-e=QUARRY_CONSUMER_WORK_DIR={WORK_DIR}"));
            for dir in extra {
                command.arg(format!("-v={0}:{0}", dir.display()));
            }
            let started = Instant::now();
            let output = command
                .arg(images.image("consumer"))
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
                .output()
                .expect("podman runs");
            check(output, &format!("starting consumer container {name}")).unwrap();
            consumers.containers.push(container.clone());
            wait_for_metrics(&container, port);
            consumers.started_in.push(started.elapsed());
        }
        consumers
    }
}

/// Waits (at most two minutes) until the consumer in `container` answers on `/metrics`.
fn wait_for_metrics(container: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        let answered = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_ok_and(|mut stream| {
                use std::io::{Read as _, Write as _};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let asked = stream
                    .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    .is_ok();
                let mut head = [0u8; 12];
                asked && stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
            });
        if answered {
            return;
        }
        let running = podman()
            .args(["inspect", "-f", "{{.State.Running}}", container])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true");
        assert!(
            running && Instant::now() < deadline,
            "consumer container {container} did not start:\n{}",
            logs(container)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the container printed (the consumer logs to stderr).
fn logs(container: &str) -> String {
    podman()
        .args(["logs", container])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|err| format!("(no logs: {err})"))
}

/// Consumer containers, removed when dropped.
pub struct ImageConsumers {
    containers: Vec<String>,
    /// From `podman run` to the first answer on `/metrics`, per container.
    pub started_in: Vec<Duration>,
    _mounted: Mounted,
}

impl ImageConsumers {
    /// Stops each as Kubernetes stops a pod (SIGTERM, then SIGKILL after the grace period) and
    /// returns their logs; an error if one did not exit cleanly.
    pub fn stop(mut self) -> anyhow::Result<Vec<String>> {
        let mut all = Vec::new();
        let mut failed = Vec::new();
        for container in std::mem::take(&mut self.containers) {
            let _ = podman().args(["stop", "-t", "30", &container]).output();
            let code = podman()
                .args(["inspect", "-f", "{{.State.ExitCode}}", &container])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            let log = logs(&container);
            let _ = podman().args(["rm", "-f", &container]).output();
            if code != "0" {
                failed.push(format!("{container} exited with {code}:\n{log}"));
            }
            all.push(log);
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
        Ok(all)
    }
}

impl Drop for ImageConsumers {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = podman().args(["rm", "-f", "-t", "0", container]).output();
        }
    }
}
