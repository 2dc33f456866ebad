//! Why a failed job failed, read from its log: a package that fails only because a dependency
//! did not compile is put under that dependency, so a hundred failures caused by one crate read
//! as one root cause; other failures are grouped by their first error (a compiler error code
//! such as E0308, an internal compiler error, the linker, failing tests).

/// The root cause of a compiler crash.
pub const ICE: &str = "internal compiler error";

/// The root cause of `package`'s failure as its log tells it; `None` when the log says nothing
/// recognizable (or the job did not fail).
pub fn root_cause(package: &str, log: &str) -> Option<String> {
    // Cargo's own verdict names the crate that did not compile; any but the package itself is
    // a dependency that broke it.
    for line in log.lines() {
        if let Some(rest) = line.trim().strip_prefix("error: could not compile `")
            && let Some((krate, _)) = rest.split_once('`')
            && !same_crate(krate, package)
        {
            return Some(format!("dependency {krate}"));
        }
    }
    if log.contains("internal compiler error")
        || log.contains("error: the compiler unexpectedly panicked")
    {
        return Some(ICE.to_owned());
    }
    if log.contains("error: linking with") || log.contains("error: linker `") {
        return Some("linker error".to_owned());
    }
    if quarry_shared::category::network_denial(log).is_some() {
        return Some("network denied".to_owned());
    }
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("error[")
            && let Some((code, _)) = rest.split_once(']')
            && code.len() == 5
            && code.starts_with('E')
        {
            return Some(code.to_owned());
        }
    }
    if log.contains("test result: FAILED") || log.contains("error: test failed") {
        return Some("tests failed".to_owned());
    }
    None
}

/// Cargo prints package names with dashes, crate names with underscores.
fn same_crate(a: &str, b: &str) -> bool {
    a.replace('-', "_") == b.replace('-', "_")
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
        assert_eq!(root_cause("my-crate", log).as_deref(), Some("E0308"));
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
