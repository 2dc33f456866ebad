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
//! any one process in it.
//!
//! It writes that to a descriptor the consumer passed (a pipe), which the step's processes can
//! neither inherit (close-on-exec) nor open through `/proc` (this process is not dumpable, and
//! the sandbox gives them no capability): a report read there comes from this program. One that
//! never came (this process was killed) leaves the step's cost unknown, as before.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::RawFd;
use std::process::{Command, ExitCode};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, getppid};

/// What a step's processes used, as this program reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// User and system time of every process of the step.
    pub cpu: Duration,
    /// The largest resident set of any one of them.
    pub max_rss_bytes: u64,
}

impl Report {
    /// The line written to the consumer.
    fn line(&self) -> String {
        format!(
            "cpu_us={} max_rss_kib={}\n",
            self.cpu.as_micros(),
            self.max_rss_bytes >> 10
        )
    }

    /// A report as [`Report::line`] wrote it; `None` for anything else (a partial write).
    pub fn parse(text: &str) -> Option<Report> {
        let line = text.strip_suffix('\n')?;
        let (cpu, rss) = line.split_once(' ')?;
        let cpu: u64 = cpu.strip_prefix("cpu_us=")?.parse().ok()?;
        let rss: u64 = rss.strip_prefix("max_rss_kib=")?.parse().ok()?;
        Some(Report {
            cpu: Duration::from_micros(cpu),
            max_rss_bytes: rss << 10,
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
    let child = Command::new(program)
        .args(&args[2..])
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.to_string_lossy()))?;
    let command = Pid::from_raw(child.id() as i32);
    let code = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => break code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => {
                break 128 + signal as i32;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("cannot wait for the step's processes: {e}")),
        }
    };
    // What is left would die with the sandbox; killed here, what it used so far is counted.
    // Only as the sandbox's first process (its parent the PID namespace's init) does `-1` mean
    // the step's processes and no others.
    if getppid() == Pid::from_raw(1) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        while !matches!(waitpid(None, None), Err(Errno::ECHILD)) {}
    }
    let used = getrusage(UsageWho::RUSAGE_CHILDREN)
        .map_err(|e| format!("cannot read what the step used: {e}"))?;
    let time = |t: nix::sys::time::TimeVal| {
        Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
    };
    let line = Report {
        cpu: time(used.user_time()) + time(used.system_time()),
        // In KiB on Linux.
        max_rss_bytes: (used.max_rss().max(0) as u64) << 10,
    }
    .line();
    let _ = std::fs::File::from(report).write_all(line.as_bytes());
    Ok(ExitCode::from((code & 0xff) as u8))
}
