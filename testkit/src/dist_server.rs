//! A rustup dist server on loopback, as a mirror of static.rust-lang.org would be: one nightly
//! channel of a date, whose `rustc`, `cargo` and `rust-std` packages are made from an installed
//! toolchain (split by the component manifests rustup left in its `lib/rustlib/`). Tests point
//! `consumer.toolchains.dist_server` at it to see consumers install a toolchain with rustup,
//! without the Internet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// The components of the minimal profile, as rustup names the packages.
const PACKAGES: [&str; 3] = ["rustc", "cargo", "rust-std"];

pub struct DistServer {
    url: String,
    requests: Arc<AtomicU64>,
    _files: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl DistServer {
    /// Serves `nightly-<date>` made of the installed toolchain `from` (for this machine's host).
    pub async fn serve(from: &str, date: &str) -> anyhow::Result<DistServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let files = tempfile::tempdir()?;
        let dist = files.path().join("dist").join(date);
        std::fs::create_dir_all(&dist)?;
        let (sysroot, host, version) = installed(from)?;
        let mut manifest = format!("manifest-version = \"2\"\ndate = \"{date}\"\n");
        for package in PACKAGES {
            // rust-std is one package per target: its component is named after the target.
            let component = match package {
                "rust-std" => format!("rust-std-{host}"),
                _ => package.to_owned(),
            };
            let name = format!("{package}-nightly-{host}");
            let tarball = dist.join(format!("{name}.tar.gz"));
            let listed = sysroot
                .join("lib/rustlib")
                .join(format!("manifest-{package}-{host}"));
            pack_component(&sysroot, &listed, &name, &component, &tarball)?;
            manifest.push_str(&format!(
                "\n[pkg.{package}]\nversion = \"{version}\"\n\n[pkg.{package}.target.{host}]\n\
                 available = true\nurl = \"{url}/dist/{date}/{name}.tar.gz\"\nhash = \"{}\"\n\
                 components = []\nextensions = []\n",
                sha256(&tarball)?
            ));
        }
        manifest.push_str(&format!(
            "\n[pkg.rust]\nversion = \"{version}\"\n\n[pkg.rust.target.{host}]\navailable = true\n\
             components = [{}]\nextensions = []\n\n[profiles]\nminimal = [{}]\n",
            PACKAGES
                .map(|p| format!("{{ pkg = \"{p}\", target = \"{host}\" }}"))
                .join(", "),
            PACKAGES.map(|p| format!("\"{p}\"")).join(", ")
        ));
        let channel = dist.join("channel-rust-nightly.toml");
        std::fs::write(&channel, &manifest)?;
        std::fs::write(
            dist.join("channel-rust-nightly.toml.sha256"),
            format!("{}  channel-rust-nightly.toml\n", sha256(&channel)?),
        )?;
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        let app = axum::Router::new()
            .fallback_service(tower_http::services::ServeDir::new(files.path()))
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    next.run(request)
                },
            ));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DistServer {
            url,
            requests,
            _files: files,
            task,
        })
    }

    /// What `RUSTUP_DIST_SERVER` is set to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Requests it has answered (or refused).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for DistServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The installed toolchain's sysroot, host and `rustc --version` (without `rustc `).
fn installed(toolchain: &str) -> anyhow::Result<(PathBuf, String, String)> {
    let rustc = |args: &[&str]| -> anyhow::Result<String> {
        let output = std::process::Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(args)
            .output()
            .context("cannot run rustc")?;
        anyhow::ensure!(
            output.status.success(),
            "toolchain {toolchain} is not installed"
        );
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    };
    let sysroot = std::fs::canonicalize(rustc(&["--print", "sysroot"])?)?;
    let verbose = rustc(&["-vV"])?;
    let host = verbose
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host")?
        .to_owned();
    let version = rustc(&["--version"])?
        .strip_prefix("rustc ")
        .unwrap_or_default()
        .to_owned();
    Ok((sysroot, host, version))
}

/// A rust-installer tarball: `<name>/` with `components`, `rust-installer-version` and the
/// component's files under `<component>/`, listed in its `manifest.in`.
fn pack_component(
    sysroot: &Path,
    listed: &Path,
    name: &str,
    component: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(listed)
        .with_context(|| format!("cannot read {}", listed.display()))?;
    let file = std::fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut text = |path: String, content: &str| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, content.as_bytes())?;
        Ok(())
    };
    text(format!("{name}/components"), &format!("{component}\n"))?;
    text(format!("{name}/rust-installer-version"), "3\n")?;
    text(format!("{name}/{component}/manifest.in"), &manifest)?;
    for line in manifest.lines() {
        let (kind, path) = line
            .split_once(':')
            .context("a manifest line without a kind")?;
        let inside = format!("{name}/{component}/{path}");
        match kind {
            "file" => tar.append_path_with_name(sysroot.join(path), inside)?,
            "dir" => tar.append_dir_all(inside, sysroot.join(path))?,
            other => anyhow::bail!("a manifest line of kind {other}"),
        }
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
