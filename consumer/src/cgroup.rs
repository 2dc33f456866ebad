//! Control groups for experiment steps: the memory and process limits of a step's whole process
//! tree (rustc, build scripts and tests counted together), a sure way to kill all of it, and a
//! kernel's word on whether it ran out of memory rather than a guess from its log.
//!
//! Both hierarchies are supported: cgroup v2 (unified, what Kubernetes nodes run today) and v1
//! (separate `memory` and `pids` hierarchies). Each consumer gets a directory under its own
//! cgroup, and each step a child of that, created before the step starts and removed after it.
//! A step's process joins its cgroup before it execs (see `spawn`) by writing `0` to the
//! `cgroup.procs` (v1: `tasks`) files opened beforehand, so it cannot fork before it is counted.
//!
//! Where no hierarchy is writable (an unprivileged container without delegation), the consumer
//! says so once and falls back to per-process rlimits.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits of one step's cgroup.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    /// Memory of all the step's processes together (swap not allowed beyond it).
    pub memory_bytes: u64,
    /// Processes and threads of the step together: a fork bomb stops here.
    pub tasks: u64,
}

/// Where this consumer creates its steps' cgroups.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        /// `<own cgroup>/quarry-<consumer>-<id>`, with the memory and pids controllers enabled
        /// for its children.
        parent: PathBuf,
    },
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        /// Where the `cpuacct` hierarchy is writable too: the steps' CPU time.
        cpuacct: Option<PathBuf>,
    },
}

impl Cgroups {
    /// Finds a writable hierarchy with the memory and pids controllers, and prepares this
    /// consumer's directory in it. `Err` says why there is none.
    pub fn detect(consumer: &str) -> Result<Cgroups, String> {
        let dir_name = format!("quarry-{}", sanitize(consumer));
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let v2 = match v2_own_dir(&own, &mounts) {
            Some(own_dir) => match prepare_v2(&own_dir, &dir_name) {
                Ok(parent) => {
                    let cgroups = Cgroups::V2 { parent };
                    cgroups.remove_leftovers();
                    return Ok(cgroups);
                }
                Err(why) => why,
            },
            None => "no cgroup2 mount with this process's cgroup".to_owned(),
        };
        let memory = v1_own_dir(&own, &mounts, "memory");
        let pids = v1_own_dir(&own, &mounts, "pids");
        match (memory, pids) {
            (Some(memory), Some(pids)) => {
                let memory = memory.join(&dir_name);
                let pids = pids.join(&dir_name);
                for dir in [&memory, &pids] {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        format!(
                            "cgroup v2: {v2}; cgroup v1: cannot create {}: {e}",
                            dir.display()
                        )
                    })?;
                }
                // Optional: only the steps' CPU time is read from it.
                let cpuacct = v1_own_dir(&own, &mounts, "cpuacct")
                    .map(|dir| dir.join(&dir_name))
                    .filter(|dir| std::fs::create_dir_all(dir).is_ok());
                let cgroups = Cgroups::V1 {
                    memory,
                    pids,
                    cpuacct,
                };
                cgroups.remove_leftovers();
                Ok(cgroups)
            }
            _ => Err(format!(
                "cgroup v2: {v2}; cgroup v1: no memory and pids hierarchies"
            )),
        }
    }

    /// Which hierarchy, for the consumer's start-up message.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { parent } => format!("cgroup v2 under {}", parent.display()),
            Cgroups::V1 {
                memory,
                pids,
                cpuacct,
            } => format!(
                "cgroup v1 under {} and {}{}",
                memory.display(),
                pids.display(),
                cpuacct
                    .as_ref()
                    .map_or_else(String::new, |dir| format!(" (CPU time: {})", dir.display()))
            ),
        }
    }

    /// This consumer's directories: the parents of its steps' cgroups.
    fn parents(&self) -> Vec<&PathBuf> {
        match self {
            Cgroups::V2 { parent } => vec![parent],
            Cgroups::V1 {
                memory,
                pids,
                cpuacct,
            } => [Some(memory), Some(pids), cpuacct.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    /// Makes sure this consumer's directories exist: another consumer's start may have removed
    /// them while no step of this one ran (see `remove_leftovers`).
    fn ensure_parents(&self) -> io::Result<()> {
        for parent in self.parents() {
            if !parent.is_dir() {
                std::fs::create_dir_all(parent)?;
                if matches!(self, Cgroups::V2 { .. }) {
                    write(parent, "cgroup.subtree_control", "+memory +pids")?;
                }
            }
        }
        Ok(())
    }

    /// Removes what consumers that died left beside this one's directories: other `quarry-*`
    /// directories and their steps' cgroups, where nothing runs in them (the kernel refuses to
    /// remove a cgroup with processes, so a live consumer's running steps are never touched; an
    /// idle live consumer recreates its directory at its next step). Without it, every consumer
    /// killed on a host would leave its directories behind for good.
    fn remove_leftovers(&self) {
        for parent in self.parents() {
            let (Some(above), Some(own)) = (parent.parent(), parent.file_name()) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(above) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with("quarry-") || name == "quarry-supervisor" || *name == *own {
                    continue;
                }
                if let Ok(steps) = std::fs::read_dir(entry.path()) {
                    for step in steps.flatten() {
                        if step.path().is_dir() {
                            let _ = std::fs::remove_dir(step.path());
                        }
                    }
                }
                if std::fs::remove_dir(entry.path()).is_ok() {
                    tracing::debug!(dir = %entry.path().display(), "removed a cgroup directory left behind");
                }
            }
        }
    }

    /// Removes this consumer's directories (when it stops; its steps' cgroups are gone by then).
    pub fn remove(&self) {
        for dir in self.parents() {
            if let Err(err) = std::fs::remove_dir(dir) {
                tracing::debug!(dir = %dir.display(), %err, "cannot remove a cgroup directory");
            }
        }
    }

    /// Creates the cgroup of one step, with its limits set.
    pub fn step(&self, name: &str, limits: CgroupLimits) -> io::Result<StepCgroup> {
        self.ensure_parents().map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot create this consumer's cgroup directories: {err}"),
            )
        })?;
        let name = sanitize(name);
        let dirs: Vec<PathBuf> = self.parents().iter().map(|p| p.join(&name)).collect();
        let v2 = matches!(self, Cgroups::V2 { .. });
        // Where the step's CPU time is counted: any v2 cgroup, v1's cpuacct.
        let cpu = match self {
            Cgroups::V2 { .. } => Some(dirs[0].join("cpu.stat")),
            Cgroups::V1 { cpuacct, .. } => cpuacct.as_ref().map(|_| dirs[2].join("cpuacct.usage")),
        };
        let mut step = StepCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            v2,
            cpu,
        };
        for dir in &dirs {
            if dir.exists() {
                // Left over by a consumer that died mid-step: empty it and start afresh.
                kill_members(dir);
                let _ = std::fs::remove_dir(dir);
            }
            std::fs::create_dir(dir).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("cannot create the step's cgroup {}: {err}", dir.display()),
                )
            })?;
            step.dirs.push(dir.clone());
        }
        let memory = limits.memory_bytes.to_string();
        let tasks = limits.tasks.to_string();
        if v2 {
            let dir = &step.dirs[0];
            write(dir, "memory.max", &memory)?;
            // No swap beyond the limit; absent where the kernel has no swap accounting.
            let _ = write(dir, "memory.swap.max", "0");
            write(dir, "pids.max", &tasks)?;
        } else {
            let (memory_dir, pids_dir) = (&step.dirs[0], &step.dirs[1]);
            write(memory_dir, "memory.limit_in_bytes", &memory)?;
            let _ = write(memory_dir, "memory.memsw.limit_in_bytes", &memory);
            write(pids_dir, "pids.max", &tasks)?;
        }
        // In v1, the child joins through `tasks`, which moves only the writing thread (the
        // child's only one): unlike `cgroup.procs`, the kernel then skips its global
        // thread-group lock, whose every taking waits for an RCU grace period, and the thread
        // that spawns the step waits for that. v2 only moves threads within threaded cgroups.
        let join_file = if v2 { "cgroup.procs" } else { "tasks" };
        for dir in &step.dirs {
            step.procs
                .push(OpenOptions::new().write(true).open(dir.join(join_file))?);
        }
        Ok(step)
    }
}

/// One step's cgroup: killed and removed when dropped.
#[derive(Debug)]
pub struct StepCgroup {
    dirs: Vec<PathBuf>,
    /// The files the child joins through (`cgroup.procs`, `tasks` in v1), opened before it
    /// is started: it only writes to them.
    procs: Vec<File>,
    v2: bool,
    /// `cpu.stat` (v2) or `cpuacct.usage` (v1), where the kernel counts the step's CPU time.
    cpu: Option<PathBuf>,
}

impl StepCgroup {
    /// File descriptors the child writes `0` to, before it execs, to join the cgroup.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether the kernel killed a process of the step for exceeding the memory limit.
    pub fn out_of_memory(&self) -> bool {
        let dir = &self.dirs[0];
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let counted = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let (name, value) = line.split_once(' ')?;
                    (name == key).then(|| value.trim().parse::<u64>().ok())?
                })
            });
        match counted {
            Some(kills) => kills > 0,
            // Kernels without the counter: the limit was hit at least once.
            None => std::fs::read_to_string(dir.join("memory.failcnt"))
                .ok()
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0),
        }
    }

    /// The CPU time (user and system) of every process the step had, where it is counted.
    pub fn cpu_time(&self) -> Option<Duration> {
        let file = self.cpu.as_ref()?;
        let text = std::fs::read_to_string(file).ok()?;
        if self.v2 {
            let usec = text.lines().find_map(|line| {
                line.strip_prefix("usage_usec ")
                    .and_then(|n| n.trim().parse().ok())
            })?;
            Some(Duration::from_micros(usec))
        } else {
            Some(Duration::from_nanos(text.trim().parse().ok()?))
        }
    }

    /// The most memory the step's processes used together (`memory.peak`, Linux 5.19 and
    /// later; `memory.max_usage_in_bytes` in v1), where the kernel keeps it.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills every process left in the step's cgroup, waiting (briefly) until they are gone:
    /// before the cgroup is removed.
    fn kill(&self) {
        for dir in &self.dirs {
            if self.v2 && write(dir, "cgroup.kill", "1").is_ok() {
                continue;
            }
            kill_members(dir);
        }
    }

    /// Sends every process in the step's cgroup SIGKILL once, without waiting for them to go:
    /// for the job's own path, where the pipe of their output tells when they are gone.
    pub fn signal(&self) {
        for dir in &self.dirs {
            if self.v2 && write(dir, "cgroup.kill", "1").is_ok() {
                continue;
            }
            signal_members(dir);
        }
    }

    /// Kills what is left and removes the cgroup on a blocking thread, without waiting for it.
    pub fn remove_in_background(self) {
        tokio::task::spawn_blocking(move || drop(self));
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        self.kill();
        for dir in &self.dirs {
            // A killed process leaves its cgroup a moment after the signal.
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => {
                        kill_members(dir);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }
}

fn kill_members(dir: &Path) {
    // Repeated because a member may fork while the list is read; the pids limit bounds it.
    for _ in 0..20 {
        if !signal_members(dir) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGKILL to every member of the cgroup at `dir`; whether there were any.
fn signal_members(dir: &Path) -> bool {
    let Ok(members) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return false;
    };
    let pids: Vec<i32> = members.lines().filter_map(|l| l.parse().ok()).collect();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    !pids.is_empty()
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(dir.join(file))?;
    f.write_all(value.as_bytes())
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// This process's cgroup v2 directory, if a cgroup2 filesystem is mounted.
fn v2_own_dir(own: &str, mounts: &str) -> Option<PathBuf> {
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mount = mounts.lines().find_map(|line| {
        let (_, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = line.split(' ').collect();
        (after.starts_with("cgroup2 ")).then(|| (fields[3], fields[4]))
    })?;
    Some(under(mount, path))
}

/// This process's cgroup v1 directory in the hierarchy of `controller`.
fn v1_own_dir(own: &str, mounts: &str, controller: &str) -> Option<PathBuf> {
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    let mount = mounts.lines().find_map(|line| {
        let (_, after) = line.split_once(" - ")?;
        let mut after = after.split(' ');
        let (fstype, _source, options) = (after.next()?, after.next()?, after.next()?);
        let fields: Vec<&str> = line.split(' ').collect();
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| (fields[3], fields[4]))
    })?;
    Some(under(mount, path))
}

/// The directory of cgroup `path` under a mount whose root (in the hierarchy) is `mount.0`,
/// mounted at `mount.1`.
fn under((root, mount_point): (&str, &str), path: &str) -> PathBuf {
    let relative = path.strip_prefix(root).unwrap_or(path);
    Path::new(mount_point).join(relative.trim_start_matches('/'))
}

/// Makes `<own>/<dir_name>` a cgroup whose children can have memory and pids limits.
fn prepare_v2(own: &Path, dir_name: &str) -> Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}: {e}", own.display()))?;
    let available: Vec<&str> = controllers.split_whitespace().collect();
    if !available.contains(&"memory") || !available.contains(&"pids") {
        return Err(format!(
            "the memory and pids controllers are not delegated to {} (it has: {})",
            own.display(),
            controllers.trim()
        ));
    }
    let enable = |dir: &Path| write(dir, "cgroup.subtree_control", "+memory +pids");
    if let Err(err) = enable(own) {
        // A cgroup with processes of its own cannot give controllers to its children: move
        // this process into a leaf beside the jobs' cgroups, then try again.
        if err.raw_os_error() != Some(nix::libc::EBUSY) {
            return Err(format!(
                "cannot enable controllers in {}: {err}",
                own.display()
            ));
        }
        let leaf = own.join("quarry-supervisor");
        std::fs::create_dir_all(&leaf)
            .and_then(|()| write(&leaf, "cgroup.procs", "0"))
            .and_then(|()| enable(own))
            .map_err(|e| format!("cannot enable controllers in {}: {e}", own.display()))?;
    }
    let parent = own.join(dir_name);
    std::fs::create_dir_all(&parent)
        .and_then(|()| enable(&parent))
        .map_err(|e| format!("cannot prepare {}: {e}", parent.display()))?;
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine where this process can create cgroups (as the consumer's tests run here).
    #[test]
    fn a_consumer_removes_what_dead_ones_left_and_recreates_its_own_if_removed() {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let Ok(dead) = Cgroups::detect(&format!("unit-dead-{id}")) else {
            eprintln!("no cgroups can be created here; nothing to check");
            return;
        };
        let limits = CgroupLimits {
            memory_bytes: 64 << 20,
            tasks: 16,
        };
        // A step's cgroup left over by a consumer killed mid-step, with nothing running in it.
        let left = dead.step("left-behind", limits).unwrap();
        std::mem::forget(left);
        let live = Cgroups::detect(&format!("unit-live-{id}")).unwrap();
        for parent in dead.parents() {
            assert!(!parent.exists(), "{} was left behind", parent.display());
        }
        // The dead one's directories are gone; were it alive and idle, its next step recreates
        // them.
        let step = dead.step("again", limits).unwrap();
        drop(step);
        dead.remove();
        assert!(live.parents().iter().all(|p| p.is_dir()));
        live.remove();
    }

    const MOUNTS: &str = "\
35 25 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
40 35 0:35 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
";

    #[test]
    fn finds_its_own_cgroups_in_both_hierarchies() {
        let own = "8:pids:/\n4:memory:/box/42\n0::/user.slice\n";
        assert_eq!(
            v1_own_dir(own, MOUNTS, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/box/42"))
        );
        assert_eq!(
            v1_own_dir(own, MOUNTS, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(
            v2_own_dir(own, MOUNTS),
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice"))
        );
    }

    #[test]
    fn a_container_sees_its_cgroup_at_the_mount_root() {
        // Inside a cgroup namespace, or a bind-mounted sub-hierarchy.
        let mounts = "30 20 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let own = "0::/kubepods/pod1/c1\n";
        assert_eq!(
            v2_own_dir(own, mounts),
            Some(PathBuf::from("/sys/fs/cgroup/c1"))
        );
    }

    #[test]
    fn names_cannot_leave_their_directory() {
        assert_eq!(sanitize("../etc/x y"), ".._etc_x_y");
    }
}
