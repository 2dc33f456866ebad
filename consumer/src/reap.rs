//! `quarry-confine reap`: a step's first process in its sandbox where no cgroup counts what the
//! step used (a Kubernetes pod, where the consumer cannot create cgroups).
//!
//! The consumer waits for bubblewrap, and bubblewrap's monitor exits as soon as its init says
//! the step's process ended, without waiting for that init: what the step's processes used
//! never reaches the consumer's `wait`. So this program sits between bubblewrap's init and the
//! step's command. It becomes the *subreaper* of everything the command starts (orphans come to
//! it, not to bubblewrap's init), runs the command, reaps every process until the command has
//! ended, kills and reaps what is left (it would die with the sandbox anyway), and then reads
//! its own `RUSAGE_CHILDREN`: the CPU time of the whole tree, and the largest resident set of
//! any one process in it. While the command runs it also samples, every 100 ms, the anonymous
//! memory of all the step's processes together (`/proc/*/statm`: what they allocated, not the
//! shared libraries each maps): the peak reported is the larger of the two. That is what a
//! cgroup's `memory.peak` would say, but for what lived less than a sample apart.
//!
//! It writes that to a descriptor the consumer passed (a pipe), which the step's processes can
//! neither inherit (close-on-exec) nor open through `/proc` (this process is not dumpable, and
//! the sandbox gives them no capability): a report read there comes from this program. One that
//! never came (this process was killed) leaves the step's cost unknown, as before.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{AsFd as _, RawFd};
use std::process::{Command, ExitCode};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getppid};

/// What a step's processes used, as this program reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// User and system time of every process of the step.
    pub cpu: Duration,
    /// The most memory the step's processes held: the larger of their anonymous memory
    /// together (sampled every [`SAMPLE_MS`]) and the largest resident set of any one of them.
    pub peak_memory_bytes: u64,
}

impl Report {
    /// The line written to the consumer.
    fn line(&self) -> String {
        format!(
            "cpu_us={} peak_kib={}\n",
            self.cpu.as_micros(),
            self.peak_memory_bytes >> 10
        )
    }

    /// A report as [`Report::line`] wrote it; `None` for anything else (a partial write).
    pub fn parse(text: &str) -> Option<Report> {
        let line = text.strip_suffix('\n')?;
        let (cpu, rss) = line.split_once(' ')?;
        let cpu: u64 = cpu.strip_prefix("cpu_us=")?.parse().ok()?;
        let peak: u64 = rss.strip_prefix("peak_kib=")?.parse().ok()?;
        Some(Report {
            cpu: Duration::from_micros(cpu),
            peak_memory_bytes: peak << 10,
        })
    }
}

/// `reap FD PROGRAM ARGS...`: runs the program as described above, reports to `FD`, and exits
/// as bubblewrap would have for the program (its code, or 128 plus the signal that ended it).
pub fn main(args: &[OsString]) -> Result<ExitCode, String> {
    let usage = "usage: quarry-confine reap FD PROGRAM ARGS...";
    let fd: RawFd = args
        .first()
        .and_then(|fd| fd.to_str())
        .and_then(|fd| fd.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or(usage)?;
    let program = args.get(1).ok_or(usage)?;
    // The report's descriptor first: nothing the command starts may hold it.
    let report = crate::spawn::inherited(fd)
        .map_err(|e| format!("cannot take the report descriptor {fd}: {e}"))?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| format!("cannot make this process undumpable: {e}"))?;
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become the step's subreaper: {e}"))?;
    // Only as the sandbox's first process (its parent the PID namespace's init) are the
    // processes `/proc` lists, and those `kill(-1)` reaches, the step's and no others.
    let sandboxed = getppid() == Pid::from_raw(1);
    let child = Command::new(program)
        .args(&args[2..])
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    let command = Pid::from_raw(child.id() as i32);
    // The command's end wakes the wait at once (a pidfd turns readable; the command is not
    // reaped before this, only this process reaps it). Not SIGCHLD blocked here: the command
    // would inherit the mask, and a shell's `wait` would never wake.
    let ended = rustix::process::Pid::from_raw(command.as_raw())
        .ok_or("the command has no pid")
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(|_| "cannot open a pidfd (Linux 5.3 or later)")
        })?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |size| size as u64);
    let mut together = 0;
    let code = loop {
        if let Some(code) = reap_ended(command)? {
            break code;
        }
        if sandboxed {
            together = together.max(anonymous_bytes(page));
        }
        let mut fds = [PollFd::new(ended.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, SAMPLE_MS);
    };
    // What is left would die with the sandbox; killed here, what it used so far is counted.
    // Killed again before each wait: a process that forked while the last kill went round
    // (a fork bomb) is not waited for alive.
    if sandboxed {
        loop {
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
            if matches!(waitpid(None, None), Err(Errno::ECHILD)) {
                break;
            }
        }
    }
    let used = getrusage(UsageWho::RUSAGE_CHILDREN)
        .map_err(|e| format!("cannot read what the step used: {e}"))?;
    let time = |t: nix::sys::time::TimeVal| {
        Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
    };
    // In KiB on Linux.
    let largest = (used.max_rss().max(0) as u64) << 10;
    let line = Report {
        cpu: time(used.user_time()) + time(used.system_time()),
        peak_memory_bytes: largest.max(together),
    }
    .line();
    let _ = std::fs::File::from(report).write_all(line.as_bytes());
    Ok(ExitCode::from((code & 0xff) as u8))
}

/// How often the step's memory is sampled while it runs.
const SAMPLE_MS: u16 = 100;

/// Reaps every process of the step that has ended; the exit code of `command` (or 128 plus
/// the signal that ended it) once it is among them.
fn reap_ended(command: Pid) -> Result<Option<i32>, String> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => {
                return Ok(Some(128 + signal as i32));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(None),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("cannot wait for the step's processes: {e}")),
        }
    }
}

/// The anonymous memory (resident, not backed by a file: what the processes allocated) of
/// every process `/proc` lists but the sandbox's init, together, with pages of `page` bytes. Shared libraries are left
/// out, as each process would count them again.
fn anonymous_bytes(page: u64) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name != "1" && name.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("statm")).ok())
        .filter_map(|statm| {
            // `size resident shared text lib data dt`, in pages.
            let mut fields = statm.split_whitespace().skip(1);
            let resident: u64 = fields.next()?.parse().ok()?;
            let shared: u64 = fields.next()?.parse().ok()?;
            Some(resident.saturating_sub(shared) * page)
        })
        .sum()
}
