//! `quarry-confine`: cargo's rustc wrapper and build scripts' trampoline inside the sandbox, for
//! target directories kept across jobs, and the step's first process where no cgroup counts
//! what a step used (`reap`). A thin command line over `quarry_consumer::confine`.

fn main() -> std::process::ExitCode {
    quarry_consumer::confine::main(std::env::args_os().collect())
}
