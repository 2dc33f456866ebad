//! The sandbox every step of a job runs in: bubblewrap with no network, its own PID namespace and
//! session, the system and the toolchains read-only, and only the job's scratch directory
//! writable (besides the sandbox's own `/tmp`, which dies with it).
//!
//! Every cargo command that reads the package runs inside, resolution (`cargo fetch`) included:
//! cargo obeys the manifest it reads, so it must have nowhere to go. The resolving step alone
//! gets a way out, to the registry and nowhere else: the job's gateway socket (`gateway.rs`),
//! bound at [`REGISTRY_SOCKET`]. When the consumer dies, the sandbox dies with it
//! (`--die-with-parent`); killing the sandbox's outer process tears down its PID namespace, and
//! with it every process the package started.
//!
//! What in the system directories only their owner may read (`/etc/shadow`, private keys under
//! `/etc/ssl/private`, a config file with secrets kept mode 600) is hidden: a consumer running as
//! root would otherwise hand it to every package's build script.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where the resolving step finds the job's registry gateway, inside the sandbox.
pub const REGISTRY_SOCKET: &str = "/run/quarry/registry.sock";

/// Where a step finds the job's cargo home, inside the sandbox: the same in every job, as cargo
/// hashes the path of every dependency's sources into its fingerprints.
pub const CARGO_HOME: &str = "/run/quarry/cargo-home";

/// Where a step finds the consumer's store of extracted dependency sources (`sources.rs`),
/// read-only; the links in the job's cargo home lead there.
pub const SOURCES: &str = "/run/quarry/sources";

/// Where a step finds its slot's kept target directory, inside the sandbox.
pub const SHARED_TARGET: &str = "/run/quarry/target";

/// What a step may touch besides the read-only system.
pub struct Mounts<'a> {
    /// The job's scratch directory: writable.
    pub writable: &'a Path,
    /// Places inside `writable` the step may only read (the job's cargo home, once resolved).
    pub read_only: &'a [&'a Path],
    /// The job's registry gateway (its socket on this host), for the step that resolves.
    pub registry: Option<&'a Path>,
    /// The job's cargo home on this host, also shown at [`CARGO_HOME`]; writable if `true`.
    pub cargo_home: Option<(&'a Path, bool)>,
    /// The consumer's store of extracted sources on this host, shown read-only at [`SOURCES`].
    pub sources: Option<&'a Path>,
    /// The slot's kept target directory on this host, shown writable at [`SHARED_TARGET`], and
    /// `quarry-confine` on this host, shown at [`crate::confine::SANDBOX_PATH`].
    pub shared_target: Option<(&'a Path, &'a Path)>,
    /// The pool of compiled units on this host, shown writable at [`crate::units::SANDBOX_PATH`]
    /// beside a shared target (only `quarry-confine` writes it: rustc and build scripts run
    /// confined away from it).
    pub units: Option<&'a Path>,
}

impl<'a> Mounts<'a> {
    /// Only `writable`: what a step that needs nothing of a job's sees (a probe, a
    /// toolchain asked who it is).
    pub fn only(writable: &'a Path) -> Mounts<'a> {
        Mounts {
            writable,
            read_only: &[],
            registry: None,
            cargo_home: None,
            sources: None,
            shared_target: None,
            units: None,
        }
    }
}

/// Directories of the host visible (read-only) inside the sandbox, if they exist.
const SYSTEM_DIRS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

#[derive(Debug, Clone)]
pub enum Sandbox {
    Bubblewrap {
        bwrap: PathBuf,
        /// Host paths mounted read-only: toolchains, cargo's proxies, the consumer's cargo home.
        read_only: Vec<PathBuf>,
        /// Paths in the system directories that not everyone may read, hidden in the sandbox.
        hidden: Vec<Hidden>,
        /// util-linux's `prlimit`, which limits a step's processes where no cgroup does.
        prlimit: Option<PathBuf>,
        /// `quarry-confine` on this host, whose `reap` counts what a step used where no cgroup
        /// does (`reap.rs`).
        reaper: Option<PathBuf>,
    },
    /// Steps run as plain child processes. Only with the operator's explicit consent.
    Unsandboxed,
}

impl Sandbox {
    /// Finds bubblewrap and checks it can really create the namespaces it needs here.
    pub async fn bubblewrap(read_only: Vec<PathBuf>) -> anyhow::Result<Sandbox> {
        let bwrap = find_on_path("bwrap").context(
            "bubblewrap (`bwrap`) is not installed: install it (Debian: apt-get install bubblewrap), \
             or start the consumer with --unsandboxed to run packages' code without isolation",
        )?;
        let probe = tokio::process::Command::new(&bwrap)
            .args(["--unshare-all", "--die-with-parent", "--new-session"])
            .args([
                "--ro-bind",
                "/",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "true",
            ])
            .output()
            .await
            .context("cannot run bwrap")?;
        if !probe.status.success() {
            bail!(
                "bubblewrap cannot create a sandbox on this machine (user namespaces disabled?): {}\n\
                 start the consumer with --unsandboxed to run packages' code without isolation",
                String::from_utf8_lossy(&probe.stderr).trim()
            );
        }
        // Secrets of the system live in /etc; the other system directories hold what packages
        // install for everyone (and walking /usr would cost every consumer start a second).
        let hidden = not_world_readable(Path::new("/etc"));
        Ok(Sandbox::Bubblewrap {
            bwrap,
            read_only,
            hidden,
            prlimit: find_on_path("prlimit"),
            reaper: None,
        })
    }

    /// Has steps asked to report what they used run under `confine`'s `reap` (the program on
    /// this host), which counts it where no cgroup does.
    pub fn reap_with(&mut self, confine: PathBuf) {
        if let Sandbox::Bubblewrap { reaper, .. } = self {
            *reaper = Some(confine);
        }
    }

    /// Whether [`Sandbox::command_line`] can have a step report what it used.
    pub fn reaps(&self) -> bool {
        matches!(
            self,
            Sandbox::Bubblewrap {
                reaper: Some(_),
                ..
            }
        )
    }

    /// Hides `paths` too (the consumer's own secret files), wherever the sandbox would show
    /// them, whatever their mode: a mounted secret is often readable by everyone.
    pub fn hide(&mut self, paths: &[PathBuf]) {
        let shown: Vec<Hidden> = paths
            .iter()
            .filter_map(|path| path.canonicalize().ok())
            .filter(|path| self.shows(path))
            .map(|path| {
                if path.is_dir() {
                    Hidden::Directory(path)
                } else {
                    Hidden::File(path)
                }
            })
            .collect();
        let Sandbox::Bubblewrap { hidden, .. } = self else {
            return;
        };
        hidden.extend(shown);
        hidden.sort();
        hidden.dedup();
    }

    /// Where a step sees the gateway socket that is at `host` on this host.
    pub fn registry_socket(&self, host: &Path) -> PathBuf {
        match self {
            Sandbox::Bubblewrap { .. } => PathBuf::from(REGISTRY_SOCKET),
            Sandbox::Unsandboxed => host.to_owned(),
        }
    }

    /// Where a step sees the store of extracted sources that is at `host` on this host.
    pub fn sources(&self, host: &Path) -> PathBuf {
        match self {
            Sandbox::Bubblewrap { .. } => PathBuf::from(SOURCES),
            Sandbox::Unsandboxed => host.to_owned(),
        }
    }

    /// Where a step sees the job's cargo home that is at `host` on this host.
    pub fn cargo_home(&self, host: &Path) -> PathBuf {
        match self {
            Sandbox::Bubblewrap { .. } => PathBuf::from(CARGO_HOME),
            Sandbox::Unsandboxed => host.to_owned(),
        }
    }

    /// Whether a step would see `path` of this host (through the system directories or the
    /// read-only binds; everything, unsandboxed).
    pub fn shows(&self, path: &Path) -> bool {
        match self {
            Sandbox::Unsandboxed => true,
            Sandbox::Bubblewrap { read_only, .. } => {
                SYSTEM_DIRS.iter().any(|dir| path.starts_with(dir))
                    || read_only.iter().any(|dir| path.starts_with(dir))
            }
        }
    }

    /// Whether [`Sandbox::command_line`] can limit a step's processes without a cgroup.
    pub fn limits_tasks(&self) -> bool {
        matches!(
            self,
            Sandbox::Bubblewrap {
                prlimit: Some(_),
                ..
            }
        )
    }

    /// The program and arguments that run `program args` in the sandbox, in `dir`, with
    /// `mounts`; with `tasks`, at most that many processes and threads at once; with `report`
    /// (where [`Sandbox::reaps`]), under `quarry-confine reap`, which writes what the step's
    /// processes used to the step's descriptor 3 ([`crate::reap::Report`]).
    ///
    /// `tasks` is for where no cgroup counts them: `RLIMIT_NPROC`, set by `prlimit` inside the
    /// sandbox. The kernel counts it per user namespace (Linux >= 5.14), and each step has its
    /// own, so it counts this step's tasks only; it was made while the consumer's own limit was
    /// in force, so the consumer and the other steps, of the same UID, do not count against it.
    pub fn command_line(
        &self,
        mounts: &Mounts<'_>,
        dir: &Path,
        program: &str,
        args: &[&str],
        tasks: Option<u64>,
        report: bool,
    ) -> (PathBuf, Vec<String>) {
        match self {
            Sandbox::Unsandboxed => (
                PathBuf::from(program),
                args.iter().map(|a| (*a).to_owned()).collect(),
            ),
            Sandbox::Bubblewrap {
                bwrap,
                read_only,
                hidden,
                prlimit,
                reaper,
            } => {
                let mut line: Vec<String> = [
                    "--unshare-all",
                    "--die-with-parent",
                    "--new-session",
                    "--cap-drop",
                    "ALL",
                ]
                .map(str::to_owned)
                .to_vec();
                fn bind(line: &mut Vec<String>, how: &str, path: &Path) {
                    let path = path.display().to_string();
                    line.extend([how.to_owned(), path.clone(), path]);
                }
                for dir in SYSTEM_DIRS {
                    bind(&mut line, "--ro-bind-try", Path::new(dir));
                }
                line.extend(
                    ["--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc"].map(str::to_owned),
                );
                for path in read_only {
                    bind(&mut line, "--ro-bind", path);
                }
                // After every bind, so that no later mount shows again what these hide.
                for hidden in hidden {
                    match hidden {
                        Hidden::Directory(path) => {
                            line.extend(["--tmpfs".to_owned(), path.display().to_string()]);
                        }
                        Hidden::File(path) => line.extend([
                            "--ro-bind".to_owned(),
                            "/dev/null".to_owned(),
                            path.display().to_string(),
                        ]),
                    }
                }
                bind(&mut line, "--bind", mounts.writable);
                for path in mounts.read_only {
                    bind(&mut line, "--ro-bind", path);
                }
                if let Some((cargo_home, writable)) = mounts.cargo_home {
                    let how = if writable { "--bind" } else { "--ro-bind" };
                    line.extend([
                        how.to_owned(),
                        cargo_home.display().to_string(),
                        CARGO_HOME.to_owned(),
                    ]);
                }
                if let Some(sources) = mounts.sources {
                    line.extend([
                        "--ro-bind".to_owned(),
                        sources.display().to_string(),
                        SOURCES.to_owned(),
                    ]);
                }
                if let Some((target, confine)) = mounts.shared_target {
                    line.extend([
                        "--bind".to_owned(),
                        target.display().to_string(),
                        SHARED_TARGET.to_owned(),
                        "--ro-bind".to_owned(),
                        confine.display().to_string(),
                        crate::confine::SANDBOX_PATH.to_owned(),
                    ]);
                    if let Some(units) = mounts.units {
                        line.extend([
                            "--bind".to_owned(),
                            units.display().to_string(),
                            crate::units::SANDBOX_PATH.to_owned(),
                        ]);
                    }
                }
                if let Some(socket) = mounts.registry {
                    line.extend([
                        "--ro-bind".to_owned(),
                        socket.display().to_string(),
                        REGISTRY_SOCKET.to_owned(),
                    ]);
                }
                // The root bubblewrap made, and the directories it made in it for the binds:
                // nothing there is for a step to write.
                let reaper = reaper.as_ref().filter(|_| report);
                // The same program a shared target shows there already.
                if let Some(reaper) = reaper.filter(|_| mounts.shared_target.is_none()) {
                    line.extend([
                        "--ro-bind".to_owned(),
                        reaper.display().to_string(),
                        crate::confine::SANDBOX_PATH.to_owned(),
                    ]);
                }
                line.extend(["--remount-ro".to_owned(), "/".to_owned()]);
                line.extend(["--chdir".to_owned(), dir.display().to_string()]);
                line.push("--".to_owned());
                if reaper.is_some() {
                    // First, so that it is the parent of everything the step runs.
                    line.extend([crate::confine::SANDBOX_PATH, "reap", "3"].map(str::to_owned));
                }
                if let (Some(tasks), Some(prlimit)) = (tasks, prlimit) {
                    // Hard and soft: the package cannot raise it again.
                    line.push(prlimit.display().to_string());
                    line.push(format!("--nproc={tasks}:{tasks}"));
                    line.push("--".to_owned());
                }
                line.push(program.to_owned());
                line.extend(args.iter().map(|a| (*a).to_owned()));
                (bwrap.clone(), line)
            }
        }
    }
}

/// A path of the system directories hidden in the sandbox: an empty directory, or `/dev/null`,
/// mounted over it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hidden {
    Directory(PathBuf),
    File(PathBuf),
}

/// Every file and directory under `dir` that others may not read (for a directory: read and
/// enter), without what lies inside the ones found. Symbolic links are not followed: they lead
/// to a path that is checked on its own, or nowhere the sandbox can see.
fn not_world_readable(dir: &Path) -> Vec<Hidden> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut hidden = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.path().symlink_metadata() else {
                continue;
            };
            let mode = metadata.permissions().mode();
            if metadata.is_dir() {
                if mode & 0o005 != 0o005 {
                    hidden.push(Hidden::Directory(entry.path()));
                } else {
                    pending.push(entry.path());
                }
            } else if metadata.is_file() && mode & 0o004 == 0 {
                hidden.push(Hidden::File(entry.path()));
            }
        }
    }
    hidden.sort();
    hidden
}

/// The first `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// The store of sources every job shares is only read, whatever a step runs (Landlock
    /// confines build scripts too where it can; this holds without it, in `test` jobs).
    #[tokio::test]
    async fn a_step_reads_the_shared_sources_and_cannot_change_them() {
        let sandbox = Sandbox::bubblewrap(Vec::new()).await.unwrap();
        let store = tempfile::tempdir().unwrap();
        std::fs::create_dir(store.path().join("dep")).unwrap();
        std::fs::write(store.path().join("dep/lib.rs"), "pub fn answer() {}").unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let mounts = Mounts {
            sources: Some(store.path()),
            ..Mounts::only(scratch.path())
        };
        let script = format!(
            "cat {SOURCES}/dep/lib.rs; echo poison >> {SOURCES}/dep/lib.rs; \
             rm -f {SOURCES}/dep/lib.rs; mv {SOURCES}/dep {SOURCES}/moved; \
             touch {SOURCES}/planted; true"
        );
        let (program, args) =
            sandbox.command_line(&mounts, scratch.path(), "sh", &["-c", &script], None, false);
        let output = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "pub fn answer() {}"
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("Read-only file system"),
            "{output:?}"
        );
        assert_eq!(
            std::fs::read_to_string(store.path().join("dep/lib.rs")).unwrap(),
            "pub fn answer() {}"
        );
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn the_consumers_secret_files_are_hidden_whatever_their_mode() {
        // A directory the sandbox shows (as it shows the toolchains), holding a secret file
        // readable by everyone, as Kubernetes mounts Secrets by default.
        let shown = tempfile::tempdir().unwrap();
        let secret = shown.path().join("amqp-url");
        std::fs::write(&secret, "amqps://quarry:hunter2@mq/%2f").unwrap();
        std::fs::write(shown.path().join("toolchain.txt"), "public").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut sandbox = Sandbox::bubblewrap(vec![shown.path().to_owned()])
            .await
            .unwrap();
        sandbox.hide(&[secret.clone(), PathBuf::from("/nonexistent/secret")]);
        let scratch = tempfile::tempdir().unwrap();
        let read = |file: PathBuf| {
            let mounts = Mounts::only(scratch.path());
            let (program, args) = sandbox.command_line(
                &mounts,
                scratch.path(),
                "cat",
                &[file.to_str().unwrap()],
                None,
                false,
            );
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        assert_eq!(read(shown.path().join("toolchain.txt")), "public");
        assert_eq!(read(secret), "", "the secret is /dev/null inside");
    }

    /// Where no cgroup counts a step's processes (a pod's consumer, UID 10001), its sandbox
    /// does: the step's own, not the consumer's nor its other steps'.
    #[tokio::test]
    async fn a_steps_processes_are_limited_without_a_cgroup() {
        let sandbox = Sandbox::bubblewrap(Vec::new()).await.unwrap();
        assert!(sandbox.limits_tasks(), "prlimit is installed");
        let scratch = tempfile::tempdir().unwrap();
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mounts = Mounts::only(scratch.path());
        // As an unprivileged user (root's processes are never counted), with 30 processes of
        // that user already running outside the sandbox.
        let start = |processes: u32| {
            let (program, args) = sandbox.command_line(
                &mounts,
                scratch.path(),
                "sh",
                &[
                    "-c",
                    &format!("for i in $(seq {processes}); do sleep 1 & done; wait"),
                ],
                Some(8),
                false,
            );
            let mut line = vec![program.display().to_string()];
            line.extend(args);
            let script =
                "for i in $(seq 30); do sleep 2 & done; \"$@\"; status=$?; wait; exit $status";
            std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(["sh", "-c", script, "sh"])
                .args(line)
                .output()
                .unwrap()
        };
        let few = start(5);
        assert!(few.status.success(), "{few:?}");
        let many = start(12);
        assert!(!many.status.success(), "{many:?}");
        assert!(
            String::from_utf8_lossy(&many.stderr).contains("Cannot fork"),
            "{many:?}"
        );
    }

    #[test]
    fn what_others_may_not_read_is_hidden() {
        let root = tempfile::tempdir().unwrap();
        let path = |p: &str| root.path().join(p);
        let mode = |p: &str, mode| {
            std::fs::set_permissions(path(p), std::fs::Permissions::from_mode(mode)).unwrap()
        };
        std::fs::create_dir_all(path("ssl/private")).unwrap();
        std::fs::create_dir_all(path("ssl/certs")).unwrap();
        std::fs::write(path("ssl/private/key.pem"), "secret").unwrap();
        std::fs::write(path("ssl/certs/ca.pem"), "public").unwrap();
        std::fs::write(path("shadow"), "secret").unwrap();
        std::fs::write(path("hosts"), "public").unwrap();
        mode("ssl/private", 0o700);
        mode("shadow", 0o640);
        mode("hosts", 0o644);
        mode("ssl/certs/ca.pem", 0o644);
        assert_eq!(
            not_world_readable(root.path()),
            [
                Hidden::Directory(path("ssl/private")),
                Hidden::File(path("shadow")),
            ]
        );
    }
}
