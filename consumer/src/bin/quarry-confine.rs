//! `quarry-confine`: cargo's rustc wrapper and build scripts' trampoline inside the sandbox, for
//! target directories kept across jobs. A thin command line over `quarry_consumer::confine`.

fn main() -> std::process::ExitCode {
    quarry_consumer::confine::main(std::env::args_os().collect())
}
