//! A RabbitMQ node of a test's own (a fresh node on free ports, its data in a temporary
//! directory), so that a test or the soak can stop and restart the broker mid-run without
//! disturbing the other tests, which share the machine's broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct PrivateRabbitMq {
    dir: tempfile::TempDir,
    node: Option<Child>,
    pub amqp_port: u16,
    pub management_port: u16,
    dist_port: u16,
    /// Whether `amqp_port` speaks AMQP over TLS (and there is no plain listener).
    tls: bool,
}

/// The server script itself, not Debian's wrapper in /usr/sbin, which switches to the rabbitmq
/// user (who could not write the temporary directory).
fn server_script() -> PathBuf {
    let packaged = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if packaged.is_file() {
        packaged
    } else {
        PathBuf::from("rabbitmq-server")
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PrivateRabbitMq {
    /// Creates a node (management plugin on, loopback only) and starts it.
    pub fn start() -> anyhow::Result<PrivateRabbitMq> {
        PrivateRabbitMq::create(None, None)
    }

    /// Like `start`, with an `advanced.config` of Erlang terms (`[{rabbit, [...]}].`): settings
    /// an operator may give a broker, such as a short `consumer_timeout`.
    pub fn start_with_advanced(advanced: &str) -> anyhow::Result<PrivateRabbitMq> {
        PrivateRabbitMq::create(None, Some(advanced))
    }

    /// Like `start`, but AMQP is served over TLS only, with this certificate (PEM files of
    /// the certificate, its key and its CA). The management API stays plain HTTP.
    pub fn start_with_tls(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<PrivateRabbitMq> {
        PrivateRabbitMq::create(Some((cert, key, ca)), None)
    }

    fn create(
        tls: Option<(&Path, &Path, &Path)>,
        advanced: Option<&str>,
    ) -> anyhow::Result<PrivateRabbitMq> {
        let dir = tempfile::Builder::new()
            .prefix("quarry-private-rabbitmq")
            .tempdir()?;
        let (amqp_port, management_port, dist_port) = (free_port()?, free_port()?, free_port()?);
        let listeners = match tls {
            None => format!("listeners.tcp.1 = 127.0.0.1:{amqp_port}\n"),
            Some((cert, key, ca)) => format!(
                "listeners.tcp = none\n\
                 listeners.ssl.1 = 127.0.0.1:{amqp_port}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                cert.display(),
                key.display(),
                ca.display()
            ),
        };
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "{listeners}\
                 management.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {management_port}\n"
            ),
        )?;
        std::fs::write(
            dir.path().join("enabled_plugins"),
            "[rabbitmq_management].\n",
        )?;
        if let Some(advanced) = advanced {
            std::fs::write(dir.path().join("advanced.config"), advanced)?;
        }
        // Read instead of /etc/rabbitmq/rabbitmq-env.conf, whose settings are the system node's.
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "")?;
        let mut broker = PrivateRabbitMq {
            dir,
            node: None,
            amqp_port,
            management_port,
            dist_port,
            tls: tls.is_some(),
        };
        broker.boot()?;
        Ok(broker)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT` (`amqps://` with TLS), for `QUARRY_TEST_AMQP_URL`.
    pub fn amqp_url(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}", self.amqp_port)
    }

    /// The management API's root, for `QUARRY_TEST_RABBITMQ_API`.
    pub fn management_api(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    /// Stops the node the way an operator's restart does (SIGTERM: connections closed, queues
    /// written out), and waits until it is gone.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut node) = self.node.take() else {
            return Ok(());
        };
        kill(Pid::from_raw(node.id() as i32), Signal::SIGTERM)?;
        node.wait()?;
        Ok(())
    }

    /// Starts it again after `stop`, with the same data, and waits until it serves.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.boot()
    }

    fn boot(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("server.out"))?;
        let node = Command::new(server_script())
            .env(
                "RABBITMQ_NODENAME",
                format!("quarry-test-{}@localhost", self.amqp_port),
            )
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            // The script then execs the VM instead of running it as a child, so that killing
            // the process kills the node (else a killed script leaves the node running).
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // Crash dumps (erl_crash.dump, MnesiaCore.*) go where the node's data is.
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start rabbitmq-server: run deploy/local/up, which installs it")?;
        self.node = Some(node);
        self.wait_until_serving()
    }

    /// Waits (at most 2 minutes) until both AMQP and the management API accept connections
    /// (the management listener opens last, once the node is fully booted).
    fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let accepts = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(accepts(self.amqp_port) && accepts(self.management_port)) {
            if let Some(node) = &mut self.node
                && let Some(status) = node.try_wait()?
            {
                bail!(
                    "rabbitmq-server exited at start ({status}): {}",
                    self.output_tail()
                );
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the private RabbitMQ node did not serve within 2 minutes: {}",
                    self.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// The node's own log so far (what it did to connections and channels, and why).
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for entry in entries.flatten() {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }

    fn output_tail(&self) -> String {
        let out = std::fs::read_to_string(self.dir.path().join("server.out")).unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivateRabbitMq {
    fn drop(&mut self) {
        // Before the data directory goes: a node outliving it crashes writing there.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut node) = self.node.take() {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}
