//! A PostgreSQL server of a test's own (a fresh cluster on a free port), so that a test can stop
//! and restart it mid-run without disturbing the other tests, which share the machine's server.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    /// Whether it serves TLS only (see `start_with_tls`).
    tls: bool,
}

impl PrivatePostgres {
    /// Creates a cluster (trust authentication, loopback only) and starts it.
    pub fn start() -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::create(None)
    }

    /// Like `start`, but TCP connections must use TLS with this certificate (PEM text of the
    /// certificate and its key): plain ones are rejected. The Unix socket (see `admin_url`)
    /// stays plain, for the test's own setup.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::create(Some((cert_pem, key_pem)))
    }

    fn create(tls: Option<(&str, &str)>) -> anyhow::Result<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server binaries are not in /usr/lib/postgresql")?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .find(|bin| bin.join("initdb").is_file())
            .context("no initdb under /usr/lib/postgresql")?;
        let dir = tempfile::Builder::new()
            .prefix("quarry-private-pg")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let server = PrivatePostgres {
            bin,
            dir,
            port,
            tls: tls.is_some(),
        };
        if let Some((cert, key)) = tls {
            std::fs::write(server.dir.path().join("server.crt"), cert)?;
            std::fs::write(server.dir.path().join("server.key"), key)?;
            // The server refuses a key others may read.
            std::fs::set_permissions(
                server.dir.path().join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
        }
        if is_root() {
            // The server refuses to run as root: the cluster belongs to the postgres user.
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path()))?;
        }
        server.as_owner(&[
            server.bin.join("initdb").to_str().unwrap_or("initdb"),
            "-D",
            &server.data().display().to_string(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ])?;
        if server.tls {
            // Order matters: the first matching line decides.
            std::fs::write(
                server.data().join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 host all all 127.0.0.1/32 reject\n",
            )?;
            if is_root() {
                run(Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(server.data().join("pg_hba.conf")))?;
            }
        }
        server.pg_ctl(&["start", "-w"])?;
        Ok(server)
    }

    /// An admin connection URL, for `QUARRY_TEST_DATABASE_URL`: over TCP, or for a TLS-only
    /// server over its Unix socket.
    pub fn admin_url(&self) -> String {
        if self.tls {
            let socket_dir: String = url::form_urlencoded::byte_serialize(
                self.dir.path().display().to_string().as_bytes(),
            )
            .collect();
            format!("postgres://postgres@{socket_dir}:{}/postgres", self.port)
        } else {
            format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
        }
    }

    /// Stops the server the way a crash does (no checkpoint, connections cut).
    pub fn kill(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"])
    }

    /// Starts it again after `kill` (crash recovery runs first) and waits until it accepts
    /// connections.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["start", "-w"])
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, action: &[&str]) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
                dir = self.dir.path().display()
            ));
        }
        let mut args = vec![
            self.bin.join("pg_ctl").display().to_string(),
            "-D".to_owned(),
            self.data().display().to_string(),
            "-l".to_owned(),
            self.dir.path().join("server.log").display().to_string(),
            "-o".to_owned(),
            options,
        ];
        args.extend(action.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.as_owner(&args)
    }

    fn as_owner(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).args(args);
            command
        } else {
            let mut command = Command::new(args[0]);
            command.args(&args[1..]);
            command
        };
        // From a directory the postgres user can read.
        command.current_dir(Path::new("/"));
        run(&mut command)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
