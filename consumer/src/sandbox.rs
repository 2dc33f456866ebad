//! The sandbox experiments run in: bubblewrap with no network, its own PID namespace and session,
//! the system and the toolchains read-only, and only the job's scratch directory writable.
//!
//! Resolution (`cargo fetch`) needs the registry, so it runs outside; every step that runs the
//! package's code (build scripts, proc macros, tests) runs inside. When the consumer dies, the
//! sandbox dies with it (`--die-with-parent`); killing the sandbox's outer process tears down its
//! PID namespace, and with it every process the package started.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

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
        Ok(Sandbox::Bubblewrap { bwrap, read_only })
    }

    /// The program and arguments that run `program args` in the sandbox, in `dir`, with
    /// `writable` as the only writable place.
    pub fn command_line(
        &self,
        writable: &Path,
        dir: &Path,
        program: &str,
        args: &[&str],
    ) -> (PathBuf, Vec<String>) {
        match self {
            Sandbox::Unsandboxed => (
                PathBuf::from(program),
                args.iter().map(|a| (*a).to_owned()).collect(),
            ),
            Sandbox::Bubblewrap { bwrap, read_only } => {
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
                bind(&mut line, "--bind", writable);
                line.extend(["--chdir".to_owned(), dir.display().to_string()]);
                line.push("--".to_owned());
                line.push(program.to_owned());
                line.extend(args.iter().map(|a| (*a).to_owned()));
                (bwrap.clone(), line)
            }
        }
    }
}

/// The first `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
