//! What a job's run used — its cost, recorded beside its outcome and apart from it: CPU time,
//! peak memory, disk, how long it waited for a slot, and each step's share. The consumer
//! measures it, the store keeps it on the result, the reporter sums it per run.

use serde::{Deserialize, Serialize};

/// What one job used where it ran. A memoized result, which ran nothing, has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// CPU time, user and system, of every step's processes, where the kernel counted it for
    /// each step: its cgroup; without one, its process tree, as the process waited for
    /// (unsandboxed) or the sandbox's reaper (`quarry-confine reap`) reaped it. None where
    /// neither could (a sandboxed step without a cgroup and without `quarry-confine`).
    pub cpu_ms: Option<u64>,
    /// The most memory one step used: all its processes together, where its cgroup counted
    /// them; sandboxed without a cgroup, their anonymous memory together as the reaper sampled
    /// it (or its largest process, if more); unsandboxed, its largest process. Like `cpu_ms`,
    /// none where nothing counted it.
    pub peak_memory_bytes: Option<u64>,
    /// What the job's scratch directory (package, cargo home, target directory) held at its end.
    pub disk_bytes: u64,
    /// From the consumer taking the job to a slot starting it.
    pub slot_wait_ms: u64,
    /// Each step, in order.
    pub steps: Vec<StepCost>,
}

/// One step of a job (`fetch`, `check`, `test`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCost {
    pub name: String,
    pub wall_ms: u64,
    pub cpu_ms: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
}

impl Cost {
    /// Adds a step's cost to the job's.
    pub fn add(&mut self, step: StepCost) {
        self.cpu_ms = match (self.steps.is_empty(), self.cpu_ms, step.cpu_ms) {
            (true, _, cpu) => cpu,
            (false, Some(job), Some(step)) => Some(job + step),
            _ => None,
        };
        self.peak_memory_bytes = match (self.steps.is_empty(), self.peak_memory_bytes) {
            (true, _) => step.peak_memory_bytes,
            (false, Some(job)) => step.peak_memory_bytes.map(|step| job.max(step)),
            (false, None) => None,
        };
        self.steps.push(step);
    }
}
