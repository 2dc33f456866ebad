//! Logging set-up shared by the binaries: human-readable lines on stderr, filtered by `RUST_LOG`
//! (default `info`). Stdout is left to each command's outcome output.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,aws_smithy_runtime=warn,aws_config=warn,tokio_postgres=warn,refinery_core=warn",
        )
    });
    // A second initialisation (tests run several binaries' mains in one process) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
