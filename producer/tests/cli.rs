//! The command line as a user meets it: help that explains, secrets that stay hidden, bad input
//! refused with a clear message.

use std::process::Command;

fn producer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quarry-producer"))
}

#[test]
fn help_never_shows_secret_values_from_the_environment() {
    let output = producer()
        .args(["run", "--help"])
        .env("QUARRY_DATABASE_URL", "postgres://quarry:hunter2@db/quarry")
        .env("QUARRY_S3_SECRET_ACCESS_KEY", "s3-hunter2")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("--toolchain"), "{help}");
    assert!(help.contains("--database-url"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[test]
fn an_invalid_toolchain_is_refused_before_anything_is_published() {
    let output = producer()
        .args(["run", "--name", "x", "--toolchain", "--evil"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let output = producer()
        .args(["run", "--name", "x", "--toolchain=stable;rm"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("invalid toolchain name"), "{stderr}");
}

#[test]
fn an_experiment_file_is_checked_before_anything_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("experiment.toml");
    std::fs::write(
        &file,
        "name = \"x\"\ntoolchains = [\"stable\"]\nmode = \"check\"\ntimout = 5\n",
    )
    .unwrap();
    let output = producer()
        .args(["run", "--experiment"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("timout"),
        "the unknown key is named: {stderr}"
    );

    // A file and definition flags together: which would win is not guessed.
    let output = producer()
        .args(["run", "--name", "y", "--experiment"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn a_bad_selection_is_refused_before_anything_is_published() {
    let refused = |args: &[&str], expected: &str| {
        let output = producer()
            .args(["run", "--name", "x", "--toolchain", "stable"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} is refused");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(&["--dump", "/nonexistent/db-dump.tar.gz"], "does not exist");
    refused(
        &["--pattern", "serde[", "--limit", "5"],
        "invalid name pattern",
    );
    refused(&["--sample", "0"], "at least one crate");
    refused(&["--dependents-of", "serde", "--depth", "0"], "at least 1");
    refused(&["--dependents-of", "not a crate"], "not a crate name");
    refused(&["--seed", "4"], "--sample");
    refused(&["--patch", "serde"], "NAME=VERSION");
    refused(
        &["--patch", "serde=/nonexistent/serde.crate"],
        "not a readable .crate",
    );
    refused(&["--patch", "serde=one"], "neither a version nor a .crate");
    refused(
        &["--patch", "serde=1.0.0", "--toolchain", "nightly"],
        "one --toolchain",
    );
}

#[test]
fn a_missing_config_file_is_named_in_the_error() {
    let output = producer()
        .args(["--config", "/nonexistent/quarry.toml", "migrate"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("/nonexistent/quarry.toml"), "{stderr}");
}
