//! Why a failed job failed, read from its log: a package that fails only because a dependency
//! did not compile is put under that dependency, so a hundred failures caused by one crate read
//! as one root cause; other failures are grouped by their *signature*: the error code and the
//! first error's message with paths, hashes and versions taken out (`E0308: mismatched types`),
//! or a compiler crash, the linker, failing tests.

use std::sync::LazyLock;

use regex::Regex;

/// The root cause of a compiler crash.
pub const ICE: &str = "internal compiler error";

/// The prefix of a root cause that is a dependency which did not build.
pub const DEPENDENCY: &str = "dependency ";

/// The most of a log's first error [`first_error`] keeps.
const FIRST_ERROR_LINES: usize = 12;
const FIRST_ERROR_CHARS: usize = 1500;

/// The root cause of `package`'s failure as its log tells it; `None` when the log says nothing
/// recognizable (or the job did not fail).
pub fn root_cause(package: &str, log: &str) -> Option<String> {
    if let Some(krate) = failed_dependency(package, log) {
        return Some(format!("{DEPENDENCY}{krate}"));
    }
    if log.contains("internal compiler error")
        || log.contains("error: the compiler unexpectedly panicked")
    {
        return Some(ICE.to_owned());
    }
    if log.contains("error: linking with") || log.contains("error: linker `") {
        return Some("linker error".to_owned());
    }
    if quarry_core::category::network_denial(log).is_some() {
        return Some("network denied".to_owned());
    }
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("error[")
            && let Some((code, message)) = rest.split_once("]:")
            && code.len() == 5
            && code.starts_with('E')
        {
            return Some(format!("{code}: {}", normalize(message)));
        }
    }
    if log.contains("test result: FAILED") || log.contains("error: test failed") {
        return Some("tests failed".to_owned());
    }
    if own_build_script_failed(log) {
        return Some("build script failed".to_owned());
    }
    log.lines()
        .filter_map(|line| line.trim().strip_prefix("error: "))
        .find(|message| !is_cargo_verdict(message))
        .map(normalize)
}

/// The crate other than `package` whose failure cargo reports (`could not compile`, a build
/// script that failed): the dependency that broke it.
fn failed_dependency<'l>(package: &str, log: &'l str) -> Option<&'l str> {
    log.lines().find_map(|line| {
        let line = line.trim();
        let rest = line
            .strip_prefix("error: could not compile `")
            .or_else(|| line.strip_prefix("error: failed to run custom build command for `"))?;
        // `name` or `name vX.Y.Z`, up to the closing backtick.
        let (krate, _) = rest.split_once('`')?;
        let krate = krate.split_once(' ').map_or(krate, |(name, _)| name);
        (!same_crate(krate, package)).then_some(krate)
    })
}

fn own_build_script_failed(log: &str) -> bool {
    log.lines().any(|line| {
        line.trim()
            .starts_with("error: failed to run custom build command for `")
    })
}

/// Cargo's summary of errors already shown, not an error of its own.
fn is_cargo_verdict(message: &str) -> bool {
    message.starts_with("could not compile `")
        || message.starts_with("aborting due to")
        || message.starts_with("failed to run custom build command")
        || message.starts_with("Recipe `")
}

/// An error message with what differs between two hits of the same error taken out: paths,
/// hashes, versions and line numbers; at most 120 characters.
pub fn normalize(message: &str) -> String {
    static PATH: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?:[A-Za-z]:)?(?:\.{0,2}/)?(?:[\w.@+-]+/)+[\w.@+-]*").unwrap()
    });
    static HASH: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b[0-9a-f]{8,}\b").unwrap());
    static VERSION: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\bv?\d+\.\d+\.\d+(?:-[\w.]+)?(?:\+[\w.]+)?").unwrap());
    static POSITION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r":\d+(?::\d+)?\b").unwrap());
    let message = message.trim();
    let message = PATH.replace_all(message, "<path>");
    let message = HASH.replace_all(&message, "<hash>");
    let message = VERSION.replace_all(&message, "<version>");
    let message = POSITION.replace_all(&message, "");
    let mut out: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > 120 {
        out = out.chars().take(119).collect::<String>() + "…";
    }
    out
}

/// The log's first error: its message and the lines that show it (rustc's `-->` location and
/// source excerpt), up to a blank line; bounded, for showing inline. `None` when there is none.
pub fn first_error(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|line| {
            let line = line.trim_start();
            (line.starts_with("error[") || line.starts_with("error: "))
                && !line.strip_prefix("error: ").is_some_and(is_cargo_verdict)
        })
        // A failing test shows its panic, not an `error:` line.
        .or_else(|| lines.iter().position(|line| line.contains("panicked at")))?;
    let mut excerpt = String::new();
    for line in lines[start..].iter().take(FIRST_ERROR_LINES) {
        if !excerpt.is_empty() && line.trim().is_empty() {
            break;
        }
        if excerpt.len() + line.len() > FIRST_ERROR_CHARS {
            excerpt.push_str("…\n");
            break;
        }
        excerpt.push_str(line);
        excerpt.push('\n');
    }
    Some(excerpt.trim_end().to_owned())
}

/// Cargo prints package names with dashes, crate names with underscores.
fn same_crate(a: &str, b: &str) -> bool {
    a.replace('-', "_")
        .eq_ignore_ascii_case(&b.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_that_did_not_compile_is_the_root_cause() {
        let log = "   Compiling dep v1.0.0\nerror[E0425]: cannot find value `x`\n\
                   error: could not compile `dep` (lib) due to 1 previous error\n";
        assert_eq!(
            root_cause("my-crate", log).as_deref(),
            Some("dependency dep")
        );
    }

    #[test]
    fn the_package_s_own_errors_are_grouped_by_their_first_code() {
        let log = "error[E0308]: mismatched types\nerror[E0599]: no method\n\
                   error: could not compile `my_crate` (lib) due to 2 previous errors\n";
        assert_eq!(
            root_cause("my-crate", log).as_deref(),
            Some("E0308: mismatched types")
        );
    }

    #[test]
    fn a_dependency_whose_build_script_failed_is_the_root_cause() {
        let log = "error: failed to run custom build command for `dep-sys v0.3.1`\n";
        assert_eq!(
            root_cause("my-crate", log).as_deref(),
            Some("dependency dep-sys")
        );
        assert_eq!(
            root_cause("dep-sys", log).as_deref(),
            Some("build script failed")
        );
    }

    #[test]
    fn signatures_leave_out_paths_hashes_versions_and_positions() {
        let a = "error: couldn't read `/tmp/quarry/job-1f3a9c0d2e/src/data.bin`: No such file \
                 or directory (os error 2)\nerror: could not compile `a` (lib)\n";
        let b = "error: couldn't read `/home/x/.cargo/registry/src/b-1.2.3/src/data.bin`: No \
                 such file or directory (os error 2)\n";
        assert_eq!(root_cause("a", a), root_cause("b", b));
        assert_eq!(
            root_cause("a", a).as_deref(),
            Some("couldn't read `<path>`: No such file or directory (os error 2)")
        );
        assert_eq!(
            normalize(
                "the trait bound `T: Serialize` is not satisfied in serde v1.0.219 at lib.rs:12:5"
            ),
            "the trait bound `T: Serialize` is not satisfied in serde <version> at lib.rs"
        );
        assert_eq!(
            normalize("symbol 5f2e3a9b7c01d4e6 missing"),
            "symbol <hash> missing"
        );
        assert_eq!(normalize(&"x".repeat(500)).chars().count(), 120);
    }

    #[test]
    fn the_first_error_is_its_message_and_location() {
        let log = "   Compiling a v1.0.0\nwarning: unused\nerror[E0308]: mismatched types\n \
                   --> src/lib.rs:1:20\n  |\n1 | pub fn f() -> u32 { \"x\" }\n  |  \
                   ^^^ expected `u32`\n\nerror[E0599]: no method\n";
        let first = first_error(log).unwrap();
        assert!(first.starts_with("error[E0308]: mismatched types\n --> src/lib.rs:1:20"));
        assert!(first.ends_with("expected `u32`"), "{first}");
        assert!(!first.contains("E0599"));
        let test = "running 1 test\nthread 'adds' panicked at src/lib.rs:3:5:\nassertion failed\n";
        assert!(
            first_error(test)
                .unwrap()
                .starts_with("thread 'adds' panicked")
        );
        assert_eq!(first_error("all good"), None);
        let long = format!("error: x\n{}\n", "y".repeat(5000));
        assert!(first_error(&long).unwrap().len() <= FIRST_ERROR_CHARS + 10);
    }

    #[test]
    fn compiler_panics_linkers_and_tests_are_named() {
        assert_eq!(
            root_cause("a", "error: internal compiler error: unexpected panic").as_deref(),
            Some("internal compiler error")
        );
        assert_eq!(
            root_cause("a", "error: linking with `cc` failed: exit status: 1").as_deref(),
            Some("linker error")
        );
        assert_eq!(
            root_cause(
                "a",
                "test tests::x ... FAILED\ntest result: FAILED. 0 passed"
            )
            .as_deref(),
            Some("tests failed")
        );
        assert_eq!(root_cause("a", "quarry: killed after the time limit"), None);
    }
}
