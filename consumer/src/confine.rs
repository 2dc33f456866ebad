//! `quarry-confine`: the program between cargo and a package's build-time code, inside the
//! sandbox, that makes a slot's target directory safe to keep across jobs (`shared_target.rs`).
//!
//! A build runs code of every package in its tree: build scripts, proc macros (inside rustc),
//! and whatever they start. In a target directory kept across jobs, any of it could overwrite a
//! dependency's compiled artifacts, and every later job would build against them. So no such
//! code runs with the target directory writable. Cargo itself (a toolchain's, trusted) still
//! writes fingerprints and moves nothing of the package's; everything else is confined with
//! Landlock, which the kernel enforces on a process and everything it starts, and which a
//! confined process can only narrow further:
//!
//! - rustc (cargo's `RUSTC_WRAPPER`) runs with only a fresh directory of its own writable: its
//!   `--out-dir` is replaced by a unit directory beside it. This program, unconfined, moves the
//!   unit's outputs (regular files whose names carry the unit's `-C extra-filename`, which no
//!   other unit's do) into place when rustc exits; the metadata is linked there as soon as
//!   rustc announces it (cargo starts the dependents then).
//! - A build script is compiled as usual, then set aside (`.real`) behind a trampoline that runs
//!   it confined to its `OUT_DIR`.
//! - Both may also write `/tmp`, `/dev` (its null device) and the job's own package tree
//!   ([`WRITABLE_ENV`]): nothing another job sees.
//!
//! Without Landlock (kernel older than 6.2, or disabled) nothing here runs: the consumer's probe
//! fails and every job gets a fresh target directory, as before.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::units;

/// Where the sandbox shows this program.
pub const SANDBOX_PATH: &str = "/run/quarry/bin/quarry-confine";

/// Colon-separated directories a confined process may write besides its own outputs, `/tmp`
/// and `/dev`: the job's package tree. Set for cargo; removed before rustc or a build script
/// runs, which see nothing of Quarry's.
pub const WRITABLE_ENV: &str = "QUARRY_CONFINE_WRITABLE";

/// Where a confined rustc writes, inside its `--out-dir`, until its outputs are moved out.
const UNIT_DIR_PREFIX: &str = ".quarry-unit";

/// The Landlock ABI whose write rights are required: v3 (Linux 6.2) is the first that stops
/// `truncate`, without which a confined process could still empty any file.
const ABI: landlock::ABI = landlock::ABI::V3;

/// The program's command line, as the binary gets it.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let result = match args.get(1).map(OsString::as_os_str) {
        Some(mode) if mode == "probe" => probe().map(|()| ExitCode::SUCCESS),
        Some(mode) if mode == "probe-confined" => probe_confined(&args[2..]),
        Some(mode) if mode == "build-script" => build_script(&args[2..]),
        Some(mode) if mode == "reap" => crate::reap::main(&args[2..]),
        Some(_) => wrap_rustc(&args[1], &args[2..]),
        None => Err(
            "usage: quarry-confine RUSTC ARGS... | build-script PROGRAM | reap FD PROGRAM \
                 ARGS... | probe"
                .to_owned(),
        ),
    };
    match result {
        Ok(code) => code,
        Err(why) => {
            eprintln!("quarry-confine: {why}");
            ExitCode::from(101)
        }
    }
}

/// Confines this process: from now on it and everything it starts may write only beneath
/// `writable` (those that exist). Fails where the kernel cannot enforce all of it.
fn restrict(writable: &[PathBuf]) -> Result<(), String> {
    let ruleset = ruleset(writable)?;
    crate::spawn::landlock_now(ruleset.as_raw_fd())
        .map_err(|e| format!("cannot confine with Landlock: {e}"))
}

/// Has `command` confined, from before its program starts, to writing beneath `own` and the
/// common places ([`writable`]), with Quarry's settings left out of its environment: one
/// process fewer than a confining program of its own between the two. The ruleset returned
/// must be kept open until the command is spawned (the child closes it at exec).
fn confine_child(command: &mut Command, own: &[&Path]) -> Result<OwnedFd, String> {
    let ruleset = ruleset(&writable(own))?;
    crate::spawn::landlock_at_exec(without_quarry(command), ruleset.as_raw_fd());
    Ok(ruleset)
}

/// A Landlock ruleset (close-on-exec) that handles every write right of [`ABI`] and grants
/// them beneath `writable` (those that exist).
fn ruleset(writable: &[PathBuf]) -> Result<OwnedFd, String> {
    use landlock::{
        AccessFs, CompatLevel, Compatible as _, Ruleset, RulesetAttr as _, RulesetCreatedAttr as _,
        path_beneath_rules,
    };
    let existing: Vec<&PathBuf> = writable.iter().filter(|p| p.exists()).collect();
    let why = |e: landlock::RulesetError| format!("cannot confine with Landlock: {e}");
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_write(ABI))
        .map_err(why)?
        .create()
        .map_err(why)?
        .add_rules(path_beneath_rules(existing, AccessFs::from_write(ABI)))
        .map_err(why)?;
    Option::<OwnedFd>::from(created)
        .ok_or_else(|| "cannot confine with Landlock: the kernel made no ruleset".to_owned())
}

/// What a confined process may write: `own`, and what every confined process may: `/tmp`,
/// `/dev` and the job's package tree.
fn writable(own: &[&Path]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = own.iter().map(|dir| dir.to_path_buf()).collect();
    dirs.extend([PathBuf::from("/tmp"), PathBuf::from("/dev")]);
    if let Some(extra) = std::env::var_os(WRITABLE_ENV) {
        dirs.extend(std::env::split_paths(&extra).filter(|p| p.is_absolute()));
    }
    dirs
}

/// Checks that Landlock confines here: a process confined to a fresh directory can write
/// there and not beside it.
fn probe() -> Result<(), String> {
    let base = std::env::temp_dir();
    let dir = base.join(format!(".quarry-confine-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let probed = Command::new(me).arg("probe-confined").arg(&dir).output();
    let _ = std::fs::remove_dir_all(&dir);
    let probed = probed.map_err(|e| format!("cannot run the probe: {e}"))?;
    if probed.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&probed.stderr).trim().to_owned())
    }
}

/// The confined half of [`probe`].
fn probe_confined(args: &[OsString]) -> Result<ExitCode, String> {
    let dir = PathBuf::from(args.first().ok_or("probe-confined: no directory")?);
    restrict(std::slice::from_ref(&dir))?;
    std::fs::write(dir.join("allowed"), b"")
        .map_err(|e| format!("a confined process cannot write where it may: {e}"))?;
    let beside = dir.with_extension("denied");
    if std::fs::write(&beside, b"").is_ok() {
        let _ = std::fs::remove_file(&beside);
        return Err("Landlock reported success, yet a confined process wrote outside".to_owned());
    }
    Ok(ExitCode::SUCCESS)
}

/// `build-script PROGRAM [ARGV0 ARGS...]`: a build script's trampoline runs it confined to its
/// `OUT_DIR`, under the name cargo ran it by (what process listings and the script itself see).
/// Where the pool of units is shown, a run of a dependency's build script is looked up there
/// first and, if it must run, added after (`units.rs`).
fn build_script(args: &[OsString]) -> Result<ExitCode, String> {
    let program = args.first().ok_or("build-script: no program")?;
    let out_dir = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute() && dir.ends_with("out"))
        .ok_or("build-script: cargo set no absolute OUT_DIR")?;
    if let Some(pool) = std::env::var_os(units::POOL_ENV).map(units::Pool::at) {
        let target = Path::new(crate::sandbox::SHARED_TARGET);
        let run = std::env::current_dir().ok().and_then(|cwd| {
            let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
            units::PoolableRun::of(
                Path::new(program),
                &args[1..],
                &cwd,
                &env,
                Path::new(crate::sandbox::SOURCES),
                target,
            )
        });
        if let Some(run) = run {
            return pooled_build_script(&pool, &run, args, &out_dir, target);
        }
    }
    restrict(&writable(&[&out_dir]))?;
    let err = without_quarry(&mut script_command(args)).exec();
    Err(format!(
        "cannot run {}: {err}",
        Path::new(program).display()
    ))
}

/// A dependency's build script run from the pool, or run confined (by this program in a
/// process of its own) and added to it, what it prints passed on to cargo as it comes.
fn pooled_build_script(
    pool: &units::Pool,
    run: &units::PoolableRun,
    args: &[OsString],
    out_dir: &Path,
    target: &Path,
) -> Result<ExitCode, String> {
    let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let adopted = || {
        let Some(hit) = pool.adopt_run(&run.key, &run.out_dir) else {
            return false;
        };
        let _ = std::io::stdout().lock().write_all(&hit.stdout);
        let _ = std::io::stderr().lock().write_all(&hit.stderr);
        units::note(target, units::Use::RunReused, &package, 0);
        true
    };
    if adopted() {
        return Ok(ExitCode::SUCCESS);
    }
    // As for a unit: one slot runs it, another waits and takes its output.
    let making = pool.make(&run.key);
    if making.is_some() && adopted() {
        return Ok(ExitCode::SUCCESS);
    }
    let mut command = script_command(args);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let ruleset = confine_child(&mut command, &[out_dir])?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run the build script: {e}"))?;
    drop(ruleset);
    let (stdout, stderr) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let printed = std::thread::spawn(move || pass_on(stdout, std::io::stdout()));
    let said = pass_on(stderr, std::io::stderr());
    let printed = printed.join().unwrap_or(None);
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for the build script: {e}"))?;
    if status.success()
        && let (Some(printed), Some(said)) = (printed, said)
        && let Ok(bytes) = pool.add_run(&run.key, &run.out_dir, &printed, &said)
    {
        units::note(target, units::Use::RunAdded, &package, bytes);
    }
    drop(making);
    Ok(exit_code(status))
}

/// The build script of a trampoline's arguments (`PROGRAM [ARGV0 ARGS...]`), under the name
/// cargo ran it by (what process listings and the script itself see).
fn script_command(args: &[OsString]) -> Command {
    let program = &args[0];
    let mut command = Command::new(program);
    command
        .arg0(args.get(1).unwrap_or(program))
        .args(args.get(2..).unwrap_or_default());
    command
}

/// Leaves Quarry's own settings out of what a confined program sees: not the package's
/// business.
fn without_quarry(command: &mut Command) -> &mut Command {
    command.env_remove(WRITABLE_ENV).env_remove(units::POOL_ENV)
}

/// Copies `from` to `to` as it comes, and returns what it copied (`None` past 4 MiB: too much
/// to pool, still all passed on).
fn pass_on(from: impl std::io::Read, mut to: impl std::io::Write) -> Option<Vec<u8>> {
    let mut reader = std::io::BufReader::new(from);
    let mut kept = Some(Vec::new());
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = to.write_all(&line);
        let _ = to.flush();
        if let Some(text) = &mut kept {
            text.extend_from_slice(&line);
            if text.len() > 4 << 20 {
                kept = None;
            }
        }
    }
    kept
}

/// The parts of a rustc command line this program acts on.
#[derive(Debug, PartialEq)]
struct Invocation {
    /// Index of the `--out-dir` value in the arguments.
    out_dir_at: usize,
    out_dir: PathBuf,
    crate_name: Option<String>,
    /// `-C extra-filename`: the unit's own suffix, in every file name of its outputs.
    extra_filename: Option<String>,
    is_bin: bool,
}

impl Invocation {
    /// `None` for a rustc that writes no outputs (`-vV`, `--print`).
    fn parse(args: &[OsString]) -> Option<Invocation> {
        let text: Vec<&str> = args.iter().map(|a| a.to_str().unwrap_or("")).collect();
        let value = |i: usize, flag: &str| -> Option<(usize, String)> {
            let arg = text[i];
            if arg == flag {
                text.get(i + 1).map(|v| (i + 1, (*v).to_owned()))
            } else {
                arg.strip_prefix(flag)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(|v| (i, v.to_owned()))
            }
        };
        let mut out_dir = None;
        let mut crate_name = None;
        let mut extra_filename = None;
        let mut is_bin = false;
        for i in 0..text.len() {
            if let Some((at, dir)) = value(i, "--out-dir") {
                out_dir = Some((at, dir));
            }
            if let Some((_, name)) = value(i, "--crate-name") {
                crate_name = Some(name);
            }
            if let Some((_, kind)) = value(i, "--crate-type") {
                is_bin |= kind == "bin";
            }
            let codegen = if text[i] == "-C" {
                text.get(i + 1).copied()
            } else {
                text[i].strip_prefix("-C")
            };
            if let Some(suffix) = codegen.and_then(|c| c.strip_prefix("extra-filename=")) {
                extra_filename = Some(suffix.to_owned());
            }
        }
        let (out_dir_at, out_dir) = out_dir?;
        Some(Invocation {
            out_dir_at,
            out_dir: PathBuf::from(out_dir),
            crate_name,
            extra_filename,
            is_bin,
        })
    }

    /// What names every output of this unit, and no other unit's.
    fn tag(&self) -> String {
        match (&self.extra_filename, &self.crate_name) {
            (Some(suffix), _) if !suffix.is_empty() => suffix.clone(),
            (_, Some(name)) => name.clone(),
            _ => String::new(),
        }
    }

    /// A build script: cargo names their crates `build_script_<file stem>`.
    fn is_build_script(&self) -> bool {
        self.is_bin
            && self
                .crate_name
                .as_deref()
                .is_some_and(|n| n.starts_with("build_script_"))
    }

    fn is_output(&self, name: &OsStr) -> bool {
        let tag = self.tag();
        !tag.is_empty() && name.to_str().is_some_and(|n| n.contains(&tag))
    }
}

/// Expands rustc's `@file` arguments (one argument per line), which cargo uses for long
/// command lines.
fn expand_argfiles(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let mut expanded = Vec::with_capacity(args.len());
    for arg in args {
        match arg.as_bytes().strip_prefix(b"@") {
            Some(path) => {
                let path = Path::new(OsStr::from_bytes(path));
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                expanded.extend(text.lines().map(OsString::from));
            }
            None => expanded.push(arg.clone()),
        }
    }
    Ok(expanded)
}

/// Cargo's `RUSTC_WRAPPER`: runs `rustc args` confined to a unit directory of its own, and
/// moves the unit's outputs to where cargo expects them.
fn wrap_rustc(rustc: &OsString, args: &[OsString]) -> Result<ExitCode, String> {
    let args = expand_argfiles(args)?;
    let Some(invocation) = Invocation::parse(&args) else {
        // Nothing written but its answer: confined to the common places all the same.
        let mut command = Command::new(rustc);
        command.args(&args);
        let _ruleset = confine_child(&mut command, &[])?;
        let status = command
            .status()
            .map_err(|e| format!("cannot run rustc: {e}"))?;
        return Ok(exit_code(status));
    };
    // The pool, where the consumer shows one, for units from the store of sources.
    let pool = std::env::var_os(units::POOL_ENV).map(units::Pool::at);
    let target = Path::new(crate::sandbox::SHARED_TARGET);
    let crate_name = invocation.crate_name.clone().unwrap_or_default();
    let poolable = pool.as_ref().and_then(|_| {
        let cwd = std::env::current_dir().ok()?;
        let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        units::Poolable::of(
            rustc,
            &args,
            &cwd,
            &env,
            Path::new(crate::sandbox::SOURCES),
            target,
        )
    });
    let adopted = |pool: &units::Pool, unit: &units::Poolable| -> Result<bool, String> {
        let Some(hit) = pool.adopt(&unit.key, &invocation.out_dir, |name| {
            invocation.is_output(name)
        }) else {
            return Ok(false);
        };
        let _ = std::io::stderr().lock().write_all(&hit.stderr);
        if invocation.is_build_script() {
            behind_trampoline(&invocation)?;
        }
        units::note(target, units::Use::Reused, &crate_name, 0);
        Ok(true)
    };
    let mut making = None;
    if let (Some(pool), Some(unit)) = (&pool, &poolable) {
        if adopted(pool, unit)? {
            return Ok(ExitCode::SUCCESS);
        }
        // Another slot may be compiling it: wait for it, then take it, rather than compile it
        // twice at once.
        making = pool.make(&unit.key);
        if making.is_some() && adopted(pool, unit)? {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let unit_dir = invocation
        .out_dir
        .join(format!("{UNIT_DIR_PREFIX}{}", invocation.tag()));
    if unit_dir.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&unit_dir)
            .map_err(|e| format!("cannot clear {}: {e}", unit_dir.display()))?;
    }
    std::fs::create_dir_all(&unit_dir)
        .map_err(|e| format!("cannot create {}: {e}", unit_dir.display()))?;
    let mut confined_args = args.clone();
    confined_args[invocation.out_dir_at] = if args[invocation.out_dir_at]
        .as_bytes()
        .starts_with(b"--out-dir=")
    {
        let mut arg = OsString::from("--out-dir=");
        arg.push(&unit_dir);
        arg
    } else {
        unit_dir.clone().into_os_string()
    };
    let mut command = Command::new(rustc);
    command.args(&confined_args).stderr(Stdio::piped());
    let ruleset = confine_child(&mut command, &[&unit_dir])?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    drop(ruleset);
    let stderr = child.stderr.take().expect("piped");
    let mut reader = std::io::BufReader::new(stderr);
    let mut out = std::io::stderr().lock();
    let mut line = Vec::new();
    // What cargo heard, for the pool to say again.
    let mut said = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                return Err(format!("cannot read rustc's output: {e}"));
            }
        }
        let forwarded = announced(&invocation, &unit_dir, &line).unwrap_or_else(|| line.clone());
        let _ = out.write_all(&forwarded);
        if poolable.is_some() {
            said.extend_from_slice(&forwarded);
        }
    }
    drop(out);
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for rustc: {e}"))?;
    let moved = move_outputs(&invocation, &unit_dir);
    let _ = std::fs::remove_dir_all(&unit_dir);
    let moved = moved?;
    if status.success()
        && let (Some(pool), Some(unit)) = (&pool, &poolable)
    {
        // Before a build script goes behind its trampoline: the pool keeps the script itself.
        let dep_info = invocation.out_dir.join(format!(
            "{crate_name}{}.d",
            invocation.extra_filename.as_deref().unwrap_or_default()
        ));
        if units::read_only_keyed_inputs(&dep_info, &unit.sources, unit.out_dir.as_deref())
            && let Ok(bytes) = pool.add(&unit.key, &invocation.out_dir, &moved, &said)
        {
            units::note(target, units::Use::Added, &crate_name, bytes);
        }
    }
    drop(making);
    if status.success() && invocation.is_build_script() {
        behind_trampoline(&invocation)?;
    }
    Ok(exit_code(status))
}

/// An artifact rustc announces (`{"artifact": PATH, "emit": ...}`: cargo starts the unit's
/// dependents on it) is linked into place first, and the line forwarded with its new path.
fn announced(invocation: &Invocation, unit_dir: &Path, line: &[u8]) -> Option<Vec<u8>> {
    // `{"$message_type":"artifact","artifact":...}` (older rustc: `{"artifact":...}`).
    if !line.starts_with(b"{") || !line.windows(11).any(|w| w == b"\"artifact\":") {
        return None;
    }
    let mut message: serde_json::Value = serde_json::from_slice(line).ok()?;
    let path = PathBuf::from(message.get("artifact")?.as_str()?);
    let name = path.file_name()?;
    if path.parent() != Some(unit_dir) || !invocation.is_output(name) {
        return None;
    }
    let placed = invocation.out_dir.join(name);
    // Linked, not moved: rustc reads the file again as it goes on (to embed it in the rlib,
    // or to finish the metadata). The move at its exit replaces the link with the file itself.
    link_output(&path, &placed).ok()?;
    message["artifact"] = serde_json::Value::String(placed.to_str()?.to_owned());
    let mut text = serde_json::to_vec(&message).ok()?;
    text.push(b'\n');
    Some(text)
}

/// Moves a regular file; anything else a confined process left there stays to be removed.
fn move_output(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = from.symlink_metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    std::fs::rename(from, to)
}

/// Links a regular file at `to` as well, replacing what was there.
fn link_output(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = from.symlink_metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    match std::fs::remove_file(to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::hard_link(from, to)
}

/// Moves what the unit wrote into its `--out-dir`: its outputs only. Returns their names.
fn move_outputs(invocation: &Invocation, unit_dir: &Path) -> Result<Vec<OsString>, String> {
    let entries = std::fs::read_dir(unit_dir)
        .map_err(|e| format!("cannot read {}: {e}", unit_dir.display()))?;
    let mut moved = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if invocation.is_output(&name) {
            // A link or a directory of that name is not moved: the unit then lacks the output
            // and its build fails, which is its own doing.
            if move_output(&entry.path(), &invocation.out_dir.join(&name)).is_ok() {
                moved.push(name);
            }
        }
    }
    Ok(moved)
}

/// Sets a build script aside and puts in its place a script that runs it confined.
fn behind_trampoline(invocation: &Invocation) -> Result<(), String> {
    let name = format!(
        "{}{}",
        invocation.crate_name.as_deref().unwrap_or_default(),
        invocation.extra_filename.as_deref().unwrap_or_default()
    );
    let program = invocation.out_dir.join(&name);
    let real = invocation.out_dir.join(format!("{name}.real"));
    std::fs::rename(&program, &real)
        .map_err(|e| format!("cannot set {} aside: {e}", program.display()))?;
    let quoted = real
        .to_str()
        .ok_or("a build script path that is not UTF-8")?;
    if quoted.contains('\'') {
        return Err(format!("a build script path with a quote: {quoted}"));
    }
    let script = format!("#!/bin/sh\nexec {SANDBOX_PATH} build-script '{quoted}' \"$0\" \"$@\"\n");
    std::fs::write(&program, script)
        .and_then(|()| std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write {}: {e}", program.display()))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(101)),
        None => ExitCode::from(101),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn a_units_outputs_are_told_apart_from_every_other_units() {
        let invocation = Invocation::parse(&args(
            "--crate-name serde --edition=2018 src/lib.rs --crate-type lib \
             --emit=dep-info,metadata -C extra-filename=-0a1b2c --out-dir /t/debug/deps",
        ))
        .unwrap();
        assert_eq!(invocation.out_dir, PathBuf::from("/t/debug/deps"));
        assert_eq!(invocation.tag(), "-0a1b2c");
        assert!(invocation.is_output(OsStr::new("libserde-0a1b2c.rmeta")));
        assert!(invocation.is_output(OsStr::new("serde-0a1b2c.d")));
        assert!(!invocation.is_output(OsStr::new("libserde_json-99ffee.rmeta")));
        assert!(!invocation.is_build_script());
        let script = Invocation::parse(&args(
            "--crate-name build_script_build build.rs --crate-type bin \
             -Cextra-filename=-77 --out-dir=/t/debug/build/x-77",
        ))
        .unwrap();
        assert!(script.is_build_script());
        assert_eq!(script.out_dir, PathBuf::from("/t/debug/build/x-77"));
        assert_eq!(Invocation::parse(&args("-vV")), None);
    }

    #[test]
    fn an_announced_artifact_is_in_place_before_cargo_hears_of_it() {
        let out = tempfile::tempdir().unwrap();
        let invocation = Invocation::parse(&args(&format!(
            "--crate-name x --crate-type lib -C extra-filename=-abc --out-dir {}",
            out.path().display()
        )))
        .unwrap();
        let unit = out.path().join(".quarry-unit-abc");
        std::fs::create_dir(&unit).unwrap();
        std::fs::write(unit.join("libx-abc.rmeta"), b"meta").unwrap();
        std::fs::write(unit.join("liby-def.rmeta"), b"not x's").unwrap();
        let line = |name: &str| {
            format!(
                "{{\"$message_type\":\"artifact\",\"artifact\":\"{}\",\"emit\":\"metadata\"}}\n",
                unit.join(name).display()
            )
        };
        let forwarded = announced(&invocation, &unit, line("libx-abc.rmeta").as_bytes()).unwrap();
        let message: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
        let placed = out.path().join("libx-abc.rmeta");
        assert_eq!(message["artifact"], placed.display().to_string());
        assert_eq!(std::fs::read(&placed).unwrap(), b"meta");
        // Another unit's name is neither moved nor rewritten.
        assert_eq!(
            announced(&invocation, &unit, line("liby-def.rmeta").as_bytes()),
            None
        );
        assert!(!out.path().join("liby-def.rmeta").exists());
    }
}
