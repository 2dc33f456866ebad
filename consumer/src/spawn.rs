//! Starting a step's process without copying the consumer.
//!
//! A step's process must join its cgroup and take its rlimits before it runs anything, so that
//! it cannot fork or allocate uncounted. `std::process::Command` can only do that with a
//! `pre_exec` hook, and a hook makes it `fork`: the kernel copies the consumer's page tables,
//! every runtime thread stalls on the address space's lock meanwhile, and each page the
//! consumer then writes is copied once more. With a no-op experiment, that was most of the
//! consumer's time (BENCHMARKS.md).
//!
//! So steps are started the way `posix_spawn` starts processes: `clone(CLONE_VM |
//! CLONE_VFORK)`, the child running on a stack of its own in the consumer's memory, doing only
//! system calls (reset signal handlers, new process group, join the cgroups, set the rlimits,
//! set up stdio, change directory, `execve`) while the calling thread waits for the `execve`.
//! Everything it needs is prepared before the clone; it allocates nothing and takes no lock.
//! The child is then waited for through a pidfd (`CLONE_PIDFD`, Linux 5.3 or later).
//!
//! Also here, as the other place a process is changed before it runs anything: enforcing a
//! Landlock ruleset, on this process or on a child at exec (`quarry-confine`, `confine.rs`).

// The one module allowed unsafe code (the workspace denies it): every block says why it is sound.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};

use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// Enforces the Landlock ruleset `ruleset` (an open ruleset file descriptor) on this process
/// and everything it starts from now on. Async-signal-safe: two system calls.
pub fn landlock_now(ruleset: RawFd) -> io::Result<()> {
    // Landlock asks an unprivileged process for no_new_privs; it also keeps a setuid program
    // started later from shedding the confinement.
    // SAFETY: a system call on integers, touching no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; the caller holds `ruleset` open.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Has `command`'s child enforce the ruleset `ruleset` between fork and exec (see
/// [`landlock_now`]); the caller keeps it open until the command is spawned. If the kernel
/// refuses, the spawn fails: nothing runs unconfined.
pub fn landlock_at_exec(command: &mut std::process::Command, ruleset: RawFd) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the hook runs in the forked child before exec and only makes the two system
    // calls of `landlock_now`: it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || landlock_now(ruleset));
    }
}

/// Takes descriptor `fd`, which this program's invoker left open for it (`quarry-confine
/// reap`'s report), as its own, marked close-on-exec so that nothing it starts inherits it.
/// Called once, at start, for a number nothing else in the process owns.
pub fn inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fcntl` on a number touches no memory; an unopened one fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (above), and by this function's contract nothing else in
    // this process owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The stack the child runs on until `execve`: it calls a few system calls and nothing else.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// A process to start: what `Command` would hold, plus what the child does to itself first.
pub struct Spawn {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: PathBuf,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Becomes the child's descriptor 3.
    fd3: Option<OwnedFd>,
    /// Open `cgroup.procs` (or v1 `tasks`) files the child writes `0` to, joining the
    /// cgroups, before anything else runs.
    cgroups: Vec<RawFd>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
}

impl Spawn {
    /// `program` is looked up in the `PATH` given with [`Spawn::env`] unless it holds a `/`.
    /// The environment starts empty, stdin is `/dev/null`, and the process leads a process
    /// group of its own.
    pub fn new(program: impl Into<OsString>, dir: &Path) -> Spawn {
        Spawn {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            dir: dir.to_owned(),
            stdout: None,
            stderr: None,
            fd3: None,
            cgroups: Vec::new(),
            rlimits: Vec::new(),
        }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Spawn
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Spawn {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn stdout(&mut self, fd: OwnedFd) -> &mut Spawn {
        self.stdout = Some(fd);
        self
    }

    pub fn stderr(&mut self, fd: OwnedFd) -> &mut Spawn {
        self.stderr = Some(fd);
        self
    }

    /// The child gets `fd` as its descriptor 3 (not close-on-exec): how `quarry-confine reap`
    /// gets its report's pipe through bubblewrap.
    pub fn fd3(&mut self, fd: OwnedFd) -> &mut Spawn {
        self.fd3 = Some(fd);
        self
    }

    /// The child joins the cgroups whose `cgroup.procs` (or `tasks`) files these are. They
    /// must stay open until `spawn` returns.
    pub fn join_cgroups(&mut self, procs: Vec<RawFd>) -> &mut Spawn {
        self.cgroups = procs;
        self
    }

    /// Sets both the soft and the hard limit of `resource` in the child.
    pub fn rlimit(&mut self, resource: nix::sys::resource::Resource, limit: u64) -> &mut Spawn {
        self.rlimits
            .push((resource as libc::__rlimit_resource_t, limit));
        self
    }

    /// Starts the process. Returns once it runs `program` (or could not).
    pub fn spawn(&mut self) -> io::Result<Child> {
        let program = resolve(&self.program, &self.env)?;
        let program = c_string(program.as_os_str())?;
        let argv: Vec<CString> = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(c_string)
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = self
            .env
            .iter()
            .map(|(key, value)| {
                let mut pair = key.clone();
                pair.push("=");
                pair.push(value);
                c_string(&pair)
            })
            .collect::<io::Result<_>>()?;
        let dir = c_string(self.dir.as_os_str())?;
        let stdin = OwnedFd::from(std::fs::File::open("/dev/null")?);
        let null_out = || -> io::Result<OwnedFd> {
            Ok(OwnedFd::from(
                std::fs::OpenOptions::new().write(true).open("/dev/null")?,
            ))
        };
        let stdout = match self.stdout.take() {
            Some(fd) => fd,
            None => null_out()?,
        };
        let stderr = match self.stderr.take() {
            Some(fd) => fd,
            None => null_out()?,
        };
        // Taken, as stdout and stderr are: the parent's copy closes when the spawn returns.
        let fd3 = self.fd3.take();
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);
        let rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = self
            .rlimits
            .iter()
            .map(|&(resource, limit)| {
                (
                    resource,
                    libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    },
                )
            })
            .collect();
        // Rust's runtime opens /dev/null on any of 0, 1 and 2 found closed at start, so these
        // are 3 or more and no `dup2` below overwrites a descriptor a later one reads.
        let mut plan = ChildPlan {
            program: program.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: envp_ptrs.as_ptr(),
            dir: dir.as_ptr(),
            stdio: [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            fd3: fd3.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
            cgroups: &self.cgroups,
            rlimits: &rlimits,
            // SAFETY: a zeroed sigset_t is a valid (empty) set; filled in below.
            mask: unsafe { std::mem::zeroed() },
            failed_at: AtomicPtr::new(std::ptr::null_mut()),
            errno: AtomicI32::new(0),
        };
        let mut stack = vec![0u8; CHILD_STACK_BYTES];
        // The stack grows down from its end, which must be 16-byte aligned.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK_BYTES) & !15;
        let mut pidfd: libc::c_int = -1;
        // SAFETY: all signals are blocked around the clone so that no handler of the consumer
        // runs in the child (which shares its memory) before the child resets them; the child
        // only reads `plan` (alive until the clone returns, which is after the child's
        // `execve` or exit: CLONE_VFORK) and writes its atomics.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut plan.mask);
            let pid = libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                &plan as *const ChildPlan as *mut libc::c_void,
                &mut pidfd as *mut libc::c_int,
            );
            let clone_error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
            if pid < 0 {
                return Err(io::Error::new(
                    clone_error.kind(),
                    format!(
                        "cannot start a process (clone with a pidfd needs Linux 5.3 or later): {clone_error}"
                    ),
                ));
            }
            pid
        };
        drop(stack);
        // SAFETY: CLONE_PIDFD stored a new descriptor (close-on-exec) for the child there.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let failed_at = plan.failed_at.load(Ordering::SeqCst);
        if !failed_at.is_null() {
            let errno = plan.errno.load(Ordering::SeqCst);
            // The child has exited already; reap it.
            let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
            let error = io::Error::from_raw_os_error(errno);
            // SAFETY: the child only stores pointers to `'static` strings.
            let stage: &str = unsafe { *failed_at };
            return Err(io::Error::new(
                error.kind(),
                format!("cannot start {:?}: {stage}: {error}", self.program),
            ));
        }
        // SAFETY: an `OwnedFd` keeps its descriptor open, and the same, while it is registered.
        match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
            Ok(pidfd) => Ok(Child {
                pid: Pid::from_raw(pid),
                pidfd: Some(pidfd),
                usage: None,
            }),
            Err(error) => {
                let (pidfd, error) = error.into_parts();
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
                Err(error)
            }
        }
    }
}

/// A started process. Dropped before it was waited for, it is killed (and reaped).
pub struct Child {
    pid: Pid,
    /// `None` once reaped.
    pidfd: Option<AsyncFd<OwnedFd>>,
    /// What it used, once reaped.
    usage: Option<Usage>,
}

/// What a reaped process used, with every descendant it (or they) waited for: a step's whole
/// tree, as bubblewrap's init reaps whatever is orphaned in the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// User and system CPU time together.
    pub cpu: std::time::Duration,
    /// The largest resident set of any one of those processes.
    pub max_rss_bytes: u64,
}

impl Usage {
    fn of(usage: &libc::rusage) -> Usage {
        let time = |t: libc::timeval| {
            std::time::Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000)
        };
        Usage {
            cpu: time(usage.ru_utime) + time(usage.ru_stime),
            // In KiB on Linux.
            max_rss_bytes: (usage.ru_maxrss.max(0) as u64) << 10,
        }
    }
}

/// Reaps the process of `pidfd` if it has ended, with what it used. The `waitid` system call
/// fills a `rusage` that glibc's wrapper (and nix's) does not pass.
fn reap(pidfd: RawFd) -> io::Result<Option<(ExitStatus, Usage)>> {
    // SAFETY: a plain-data struct the kernel fills; all zeroes is a valid value of it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for writes for the duration of the call.
    let done = unsafe {
        libc::syscall(
            libc::SYS_waitid,
            libc::P_PIDFD,
            pidfd,
            &mut info as *mut libc::siginfo_t,
            libc::WEXITED | libc::WNOHANG,
            &mut usage as *mut libc::rusage,
        )
    };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled for SIGCHLD (`WNOHANG` with nothing to report leaves it zeroed).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // Encoded as `waitpid` reports it, which is what `ExitStatus` holds on Unix.
    let status = match info.si_code {
        libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
        libc::CLD_KILLED => ExitStatus::from_raw(status),
        libc::CLD_DUMPED => ExitStatus::from_raw(status | 0x80),
        // Only exits are waited for (no WSTOPPED or WCONTINUED).
        _ => ExitStatus::from_raw(0xff << 8),
    };
    Ok(Some((status, Usage::of(&usage))))
}

impl Child {
    pub fn id(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Waits for the process to end and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let Some(pidfd) = &self.pidfd else {
            return Err(io::Error::other("the process was already waited for"));
        };
        loop {
            let mut ready = pidfd.readable().await?;
            match reap(pidfd.get_ref().as_raw_fd()) {
                Ok(None) => ready.clear_ready(),
                Ok(Some((status, usage))) => {
                    self.pidfd = None;
                    self.usage = Some(usage);
                    return Ok(status);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// What the process and the descendants it waited for used, once it was waited for.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let Some(pidfd) = self.pidfd.take() else {
            return;
        };
        // Not reaped yet, so the pid is still this process's.
        let _ = kill(self.pid, Signal::SIGKILL);
        let pidfd = pidfd.into_inner();
        let reap = move || {
            let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
        };
        // A killed process may take a moment to exit: not on a runtime thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(reap)),
            Err(_) => reap(),
        }
    }
}

/// Finds `program` the way `execvp` would, in the `PATH` of the child's environment.
fn resolve(program: &OsStr, env: &[(OsString, OsString)]) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{program:?} is not in the PATH {path:?}"),
            )
        })
}

fn c_string(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{text:?} holds a NUL byte"),
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Everything the child needs, prepared by the parent.
struct ChildPlan<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    dir: *const libc::c_char,
    /// Becomes the child's stdin, stdout and stderr.
    stdio: [RawFd; 3],
    /// Becomes the child's descriptor 3, if not -1.
    fd3: RawFd,
    cgroups: &'a [RawFd],
    rlimits: &'a [(libc::__rlimit_resource_t, libc::rlimit)],
    /// The parent's signal mask, the child's once it has reset the signals' handlers.
    mask: libc::sigset_t,
    /// Set by the child when it fails: what it was doing (a `'static` string, as the child
    /// cannot allocate) and the error.
    failed_at: AtomicPtr<&'static str>,
    errno: AtomicI32,
}

/// The child, until `execve`. Only system calls: it shares the parent's memory, whose other
/// threads may hold the allocator's locks.
extern "C" fn child_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passed a `ChildPlan` it keeps alive until this process execs or exits.
    let plan = unsafe { &*(plan as *const ChildPlan) };
    let fail = |stage: &'static &'static str| -> libc::c_int {
        // SAFETY: errno is read right after the failed call; `_exit` runs no destructor and
        // no atexit handler of the parent's.
        unsafe {
            plan.errno
                .store(*libc::__errno_location(), Ordering::SeqCst);
            plan.failed_at
                .store(std::ptr::from_ref(stage).cast_mut(), Ordering::SeqCst);
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on descriptors and strings the parent prepared.
    unsafe {
        // Handlers are the consumer's code: back to the defaults before signals are unblocked.
        // SIGPIPE too, which Rust ignores and children expect to kill them, as std does.
        let mut action: libc::sigaction = std::mem::zeroed();
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..65 {
            if libc::sigaction(signal, std::ptr::null(), &mut action) == 0
                && (action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN
                    || signal == libc::SIGPIPE)
            {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(&"cannot make its process group");
        }
        for &procs in plan.cgroups {
            if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                return fail(&"cannot join its cgroup");
            }
        }
        for (resource, limit) in plan.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                return fail(&"cannot set its resource limits");
            }
        }
        for (target, &source) in plan.stdio.iter().enumerate() {
            if libc::dup2(source, target as libc::c_int) < 0 {
                return fail(&"cannot set up its stdin, stdout and stderr");
            }
        }
        // After stdio, whose sources may be 3: those copies are made. `dup2` onto itself
        // would leave the descriptor close-on-exec.
        let passed = match plan.fd3 {
            -1 => 0,
            3 => libc::fcntl(3, libc::F_SETFD, 0),
            fd => libc::dup2(fd, 3),
        };
        if passed < 0 {
            return fail(&"cannot pass it descriptor 3");
        }
        if libc::chdir(plan.dir) != 0 {
            return fail(&"cannot change to its directory");
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &plan.mask, std::ptr::null_mut());
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(&"cannot execute it")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn output_of(spawn: &mut Spawn) -> (ExitStatus, String, i32) {
        let (writer, mut reader) = {
            let (w, r) = tokio::net::unix::pipe::pipe().unwrap();
            (w.into_blocking_fd().unwrap(), r)
        };
        spawn.stdout(writer.try_clone().unwrap()).stderr(writer);
        let mut child = spawn.spawn().unwrap();
        // The spawn holds no copy of the writing end any more: the pipe ends with the child.
        let mut output = String::new();
        reader.read_to_string(&mut output).await.unwrap();
        (child.wait().await.unwrap(), output, child.id())
    }

    #[tokio::test]
    async fn a_process_gets_its_arguments_environment_directory_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawn = Spawn::new("sh", dir.path());
        spawn
            .args([
                "-c",
                "echo \"$1 $GREETING $(pwd) $(ulimit -f) $(cut -d' ' -f5 /proc/$$/stat)\"; echo err >&2; exit 3",
                "sh",
                "first",
            ])
            .env("PATH", "/usr/bin:/bin")
            .env("GREETING", "hello")
            .rlimit(nix::sys::resource::Resource::RLIMIT_FSIZE, 512 * 1024);
        let (status, output, pid) = output_of(&mut spawn).await;
        assert_eq!(status.code(), Some(3));
        let fields: Vec<&str> = output.split_whitespace().collect();
        assert_eq!(
            fields[..3],
            ["first", "hello", dir.path().to_str().unwrap()]
        );
        // ulimit -f counts blocks of 512 bytes.
        assert_eq!(fields[3], "1024");
        assert_eq!(fields[5], "err");
        // Its own process group, led by itself.
        assert_eq!(fields[4], pid.to_string());
    }

    #[tokio::test]
    async fn a_signal_ending_the_process_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawn = Spawn::new("/bin/sh", dir.path());
        spawn.args(["-c", "kill -TERM $$"]);
        let (status, ..) = output_of(&mut spawn).await;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn what_cannot_be_started_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Spawn::new("no-such-program", dir.path())
            .env("PATH", "/usr/bin:/bin")
            .spawn()
            .err()
            .unwrap();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
        let gone = dir.path().join("gone");
        let no_dir = Spawn::new("/bin/true", &gone).spawn().err().unwrap();
        assert!(
            no_dir
                .to_string()
                .contains("cannot change to its directory"),
            "{no_dir}"
        );
    }

    #[tokio::test]
    async fn a_dropped_process_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let child = Spawn::new("/bin/sleep", dir.path())
            .args(["600"])
            .spawn()
            .unwrap();
        let pid = child.pid;
        drop(child);
        // Reaped on a blocking thread: gone within a moment.
        for _ in 0..200 {
            if kill(pid, None).is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the dropped process still exists");
    }
}
